//! Two-way transformer of the mask decoder: tokens attend to the image and the image attends back
//! to the tokens (`TwoWayTransformer`, `TwoWayAttentionBlock`, `Attention` of the official code).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use sam2rad_nn::{linear, ops, LayerNorm, Linear};

/// PyTorch's default LayerNorm eps, used by every norm of the decoder transformer.
const LN_EPS: f64 = 1e-5;

/// Key names of the two linear layers of a transformer MLP, which differ between generations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlpNames {
    /// SAM 1 / MobileSAM: `mlp.lin1`, `mlp.lin2`.
    Lin,
    /// SAM 2: `mlp.layers.0`, `mlp.layers.1`.
    Layers,
}

impl MlpNames {
    fn keys(self) -> (&'static str, &'static str) {
        match self {
            MlpNames::Lin => ("lin1", "lin2"),
            MlpNames::Layers => ("layers.0", "layers.1"),
        }
    }
}

/// Two-layer ReLU MLP of a transformer block (`MLPBlock` with `act=nn.ReLU`).
#[derive(Debug, Clone)]
pub struct MlpBlock {
    lin1: Linear,
    lin2: Linear,
}

impl MlpBlock {
    /// Loads `dim → mlp_dim → dim` under the key names `names`.
    pub fn new(dim: usize, mlp_dim: usize, names: MlpNames, vb: VarBuilder) -> Result<Self> {
        let (k1, k2) = names.keys();
        Ok(Self {
            lin1: linear(dim, mlp_dim, vb.pp(k1))?,
            lin2: linear(mlp_dim, dim, vb.pp(k2))?,
        })
    }

    /// `lin2(relu(lin1(x)))`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.lin2.forward(&self.lin1.forward(x)?.relu()?)
    }
}

/// The low-rank update of a [`LoraLinear`]: `Δy = scale · x Aᵀ Bᵀ`.
#[derive(Debug, Clone)]
struct LoraUpdate {
    /// Down projection `A` [rank, in].
    a: Tensor,
    /// Up projection `B` [out, rank], initialised to zero so an attached update starts as a no-op.
    b: Tensor,
    /// `alpha / rank`.
    scale: f64,
}

/// A linear layer with an optional LoRA update (`y = W x + b + (alpha/r)·B A x`).
#[derive(Debug, Clone)]
pub struct LoraLinear {
    base: Linear,
    lora: Option<LoraUpdate>,
}

impl LoraLinear {
    /// Wraps a plain linear layer (no update attached: the forward is exactly the base one).
    pub fn new(base: Linear) -> Self {
        Self { base, lora: None }
    }

    /// The wrapped linear layer.
    pub fn base(&self) -> &Linear {
        &self.base
    }

    /// Whether a LoRA update is attached.
    pub fn has_lora(&self) -> bool {
        self.lora.is_some()
    }

    /// Attaches a rank-`rank` update with keys `a` [rank, in] (Kaiming-uniform init hint) and `b`
    /// [out, rank] (zero init hint) under `vb`; fails when one is already attached.
    pub fn attach_lora(&mut self, rank: usize, alpha: f64, vb: VarBuilder) -> Result<()> {
        if self.lora.is_some() {
            candle_core::bail!("LoRA is already attached to this layer")
        }
        if rank == 0 {
            candle_core::bail!("LoRA rank must be positive")
        }
        let (out, inp) = self.base.weight().dims2()?;
        let a = vb.get_with_hints((rank, inp), "a", candle_nn::init::DEFAULT_KAIMING_UNIFORM)?;
        let b = vb.get_with_hints((out, rank), "b", candle_nn::init::ZERO)?;
        self.lora = Some(LoraUpdate {
            a,
            b,
            scale: alpha / rank as f64,
        });
        Ok(())
    }
}

impl Module for LoraLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.base.forward(x)?;
        let Some(l) = &self.lora else {
            return Ok(y);
        };
        // Two thin matmuls on the flattened rows (never materialise the dense B·A product).
        let k = x.dim(candle_core::D::Minus1)?;
        let rows = x.elem_count() / k.max(1);
        let x2 = x.contiguous()?.reshape((rows, k))?;
        let delta = x2.matmul(&l.a.t()?)?.matmul(&l.b.t()?)?;
        y.add(&delta.affine(l.scale, 0.0)?.reshape(y.shape())?)
    }
}

/// Multi-head attention whose projections may shrink the width by `downsample_rate`.
#[derive(Debug, Clone)]
pub struct Attention {
    /// Query projection (`dim → dim/downsample_rate`), LoRA-capable.
    pub q_proj: LoraLinear,
    /// Key projection.
    pub k_proj: Linear,
    /// Value projection, LoRA-capable.
    pub v_proj: LoraLinear,
    /// Output projection back to `dim`.
    pub out_proj: Linear,
    num_heads: usize,
    head_dim: usize,
}

impl Attention {
    /// Loads `{q,k,v,out}_proj` for width `dim`, `num_heads` heads and the given downsample rate.
    pub fn new(
        dim: usize,
        num_heads: usize,
        downsample_rate: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        if downsample_rate == 0
            || num_heads == 0
            || !(dim / downsample_rate).is_multiple_of(num_heads)
        {
            candle_core::bail!(
                "attention: internal dim {dim}/{downsample_rate} must be divisible by {num_heads} heads"
            )
        }
        let internal = dim / downsample_rate;
        Ok(Self {
            q_proj: LoraLinear::new(linear(dim, internal, vb.pp("q_proj"))?),
            k_proj: linear(dim, internal, vb.pp("k_proj"))?,
            v_proj: LoraLinear::new(linear(dim, internal, vb.pp("v_proj"))?),
            out_proj: linear(internal, dim, vb.pp("out_proj"))?,
            num_heads,
            head_dim: internal / num_heads,
        })
    }

    /// Attaches LoRA to `q_proj` (keys `q.{a,b}` under `vb`) and `v_proj` (`v.{a,b}`).
    pub fn attach_lora(&mut self, rank: usize, alpha: f64, vb: VarBuilder) -> Result<()> {
        self.q_proj.attach_lora(rank, alpha, vb.pp("q"))?;
        self.v_proj.attach_lora(rank, alpha, vb.pp("v"))
    }

    /// [B, N, C] → [B, heads, N, C/heads].
    fn separate_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        x.reshape((b, n, self.num_heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// Attention of `q` [B,Nq,dim] over `k`/`v` [B,Nk,dim]; returns [B,Nq,dim].
    pub fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let q = self.separate_heads(&self.q_proj.forward(q)?)?;
        let k = self.separate_heads(&self.k_proj.forward(k)?)?;
        let v = self.separate_heads(&self.v_proj.forward(v)?)?;
        let attn = q.matmul(&k.t()?)?;
        // A true division (not a reciprocal multiply), as PyTorch does for `attn / sqrt(d)`.
        let scale =
            Tensor::new((self.head_dim as f32).sqrt(), attn.device())?.to_dtype(attn.dtype())?;
        let attn = ops::softmax_last_dim(&attn.broadcast_div(&scale)?)?;
        let out = attn.matmul(&v)?;
        let (b, h, n, d) = out.dims4()?;
        let out = out.transpose(1, 2)?.reshape((b, n, h * d))?;
        self.out_proj.forward(&out)
    }
}

/// One two-way block: token self-attention, token→image attention, MLP, image→token attention.
#[derive(Debug, Clone)]
pub struct TwoWayAttentionBlock {
    self_attn: Attention,
    norm1: LayerNorm,
    cross_attn_token_to_image: Attention,
    norm2: LayerNorm,
    mlp: MlpBlock,
    norm3: LayerNorm,
    norm4: LayerNorm,
    cross_attn_image_to_token: Attention,
    skip_first_layer_pe: bool,
}

impl TwoWayAttentionBlock {
    /// Loads a block; `skip_first_layer_pe` drops the PE and the residual of the self-attention.
    pub fn new(
        dim: usize,
        num_heads: usize,
        mlp_dim: usize,
        attention_downsample_rate: usize,
        skip_first_layer_pe: bool,
        mlp_names: MlpNames,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            self_attn: Attention::new(dim, num_heads, 1, vb.pp("self_attn"))?,
            norm1: LayerNorm::new(dim, LN_EPS, vb.pp("norm1"))?,
            cross_attn_token_to_image: Attention::new(
                dim,
                num_heads,
                attention_downsample_rate,
                vb.pp("cross_attn_token_to_image"),
            )?,
            norm2: LayerNorm::new(dim, LN_EPS, vb.pp("norm2"))?,
            mlp: MlpBlock::new(dim, mlp_dim, mlp_names, vb.pp("mlp"))?,
            norm3: LayerNorm::new(dim, LN_EPS, vb.pp("norm3"))?,
            norm4: LayerNorm::new(dim, LN_EPS, vb.pp("norm4"))?,
            cross_attn_image_to_token: Attention::new(
                dim,
                num_heads,
                attention_downsample_rate,
                vb.pp("cross_attn_image_to_token"),
            )?,
            skip_first_layer_pe,
        })
    }

    /// Attaches LoRA to q and v of the block's three attentions (`self_attn`,
    /// `cross_attn_token_to_image`, `cross_attn_image_to_token` under `vb`).
    pub fn attach_lora(&mut self, rank: usize, alpha: f64, vb: VarBuilder) -> Result<()> {
        self.self_attn
            .attach_lora(rank, alpha, vb.pp("self_attn"))?;
        self.cross_attn_token_to_image.attach_lora(
            rank,
            alpha,
            vb.pp("cross_attn_token_to_image"),
        )?;
        self.cross_attn_image_to_token
            .attach_lora(rank, alpha, vb.pp("cross_attn_image_to_token"))
    }

    /// Updates `(queries [B,Nq,C], keys [B,Nk,C])`; the PEs may have batch 1 (broadcast).
    pub fn forward(
        &self,
        queries: &Tensor,
        keys: &Tensor,
        query_pe: &Tensor,
        key_pe: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let queries = if self.skip_first_layer_pe {
            self.self_attn.forward(queries, queries, queries)?
        } else {
            let q = queries.broadcast_add(query_pe)?;
            (queries + self.self_attn.forward(&q, &q, queries)?)?
        };
        let queries = self.norm1.forward(&queries)?;

        let q = queries.broadcast_add(query_pe)?;
        let k = keys.broadcast_add(key_pe)?;
        let attn_out = self.cross_attn_token_to_image.forward(&q, &k, keys)?;
        let queries = self.norm2.forward(&(queries + attn_out)?)?;

        let mlp_out = self.mlp.forward(&queries)?;
        let queries = self.norm3.forward(&(queries + mlp_out)?)?;

        let q = queries.broadcast_add(query_pe)?;
        let attn_out = self.cross_attn_image_to_token.forward(&k, &q, &queries)?;
        let keys = self.norm4.forward(&(keys + attn_out)?)?;
        Ok((queries, keys))
    }
}

/// The decoder transformer: `depth` two-way blocks and a final token→image attention.
#[derive(Debug, Clone)]
pub struct TwoWayTransformer {
    layers: Vec<TwoWayAttentionBlock>,
    final_attn_token_to_image: Attention,
    norm_final_attn: LayerNorm,
}

impl TwoWayTransformer {
    /// Loads `layers.{0..depth}`, `final_attn_token_to_image` and `norm_final_attn`.
    pub fn new(
        depth: usize,
        dim: usize,
        num_heads: usize,
        mlp_dim: usize,
        attention_downsample_rate: usize,
        mlp_names: MlpNames,
        vb: VarBuilder,
    ) -> Result<Self> {
        let layers = (0..depth)
            .map(|i| {
                TwoWayAttentionBlock::new(
                    dim,
                    num_heads,
                    mlp_dim,
                    attention_downsample_rate,
                    i == 0,
                    mlp_names,
                    vb.pp(format!("layers.{i}")),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            final_attn_token_to_image: Attention::new(
                dim,
                num_heads,
                attention_downsample_rate,
                vb.pp("final_attn_token_to_image"),
            )?,
            norm_final_attn: LayerNorm::new(dim, LN_EPS, vb.pp("norm_final_attn"))?,
        })
    }

    /// Attaches LoRA to q and v of every attention: `layers.{i}.*` (three per block) and
    /// `final_attn_token_to_image` under `vb` — 7 attentions for the official depth 2.
    pub fn attach_lora(&mut self, rank: usize, alpha: f64, vb: VarBuilder) -> Result<()> {
        for (i, layer) in self.layers.iter_mut().enumerate() {
            layer.attach_lora(rank, alpha, vb.pp(format!("layers.{i}")))?;
        }
        self.final_attn_token_to_image
            .attach_lora(rank, alpha, vb.pp("final_attn_token_to_image"))
    }

    /// Runs on `image_embedding` [B,C,H,W], `image_pe` [1 or B,C,H,W] and `point_embedding`
    /// [B,N,C]; returns the tokens [B,N,C] and the image keys [B,H·W,C].
    pub fn forward(
        &self,
        image_embedding: &Tensor,
        image_pe: &Tensor,
        point_embedding: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let keys = image_embedding
            .flatten_from(2)?
            .transpose(1, 2)?
            .contiguous()?;
        let key_pe = image_pe.flatten_from(2)?.transpose(1, 2)?.contiguous()?;
        let mut queries = point_embedding.clone();
        let mut keys = keys;
        for layer in &self.layers {
            (queries, keys) = layer.forward(&queries, &keys, point_embedding, &key_pe)?;
        }
        let q = (&queries + point_embedding)?;
        let k = keys.broadcast_add(&key_pe)?;
        let attn_out = self.final_attn_token_to_image.forward(&q, &k, &keys)?;
        let queries = self.norm_final_attn.forward(&(queries + attn_out)?)?;
        Ok((queries, keys))
    }
}
