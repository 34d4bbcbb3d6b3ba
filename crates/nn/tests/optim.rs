//! AdamW (groups, decay, skipping, state round-trip), gradient clipping and the cosine schedule.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use sam2rad_nn::optim::{clip_grad_norm, AdamW, AdamWConfig, CosineSchedule, ParamGroup};

fn scalar(v: f64) -> Var {
    Var::from_tensor(&Tensor::new(&[v], &Device::Cpu).unwrap()).unwrap()
}

fn value(v: &Var) -> f64 {
    v.as_tensor()
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[0]
}

/// Gradients of `Σ c_i · v_i` (so grad v_i = c_i).
fn linear_grads(terms: &[(&Var, f64)]) -> GradStore {
    let mut total: Option<Tensor> = None;
    for (v, c) in terms {
        let term = v.as_tensor().affine(*c, 0.0).unwrap().sum_all().unwrap();
        total = Some(match total {
            Some(t) => (t + term).unwrap(),
            None => term,
        });
    }
    total.unwrap().backward().unwrap()
}

/// PyTorch AdamW for one scalar parameter with constant gradient `g` over `steps` steps.
fn torch_adamw(mut p: f64, g: f64, lr: f64, wd: f64, steps: u32) -> f64 {
    let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8);
    let (mut m, mut v) = (0.0, 0.0);
    for t in 1..=steps {
        p *= 1.0 - lr * wd;
        m = b1 * m + (1.0 - b1) * g;
        v = b2 * v + (1.0 - b2) * g * g;
        let bc1 = 1.0 - b1.powi(t as i32);
        let bc2 = 1.0 - b2.powi(t as i32);
        p -= lr / bc1 * m / ((v.sqrt() / bc2.sqrt()) + eps);
    }
    p
}

#[test]
fn adamw_one_step_by_hand_two_groups() {
    let a = scalar(1.0);
    let b = scalar(-2.0);
    let untouched = scalar(5.0);
    let mut opt = AdamW::new(
        vec![
            ParamGroup {
                vars: vec![a.clone(), untouched.clone()],
                lr: 0.1,
                weight_decay: 0.01,
            },
            ParamGroup {
                vars: vec![b.clone()],
                lr: 0.01,
                weight_decay: 0.0,
            },
        ],
        AdamWConfig::default(),
    )
    .unwrap();
    // grad a = 0.5, grad b = 3; `untouched` gets no gradient and must be skipped.
    opt.step(&linear_grads(&[(&a, 0.5), (&b, 3.0)])).unwrap();
    // Step 1: m̂ = g, v̂ = g², so p ← p·(1 − lr·wd) − lr·g/(|g| + eps).
    let want_a = 1.0 * (1.0 - 0.1 * 0.01) - 0.1 * 0.5 / (0.5 + 1e-8);
    let want_b = -2.0 - 0.01 * 3.0 / (3.0 + 1e-8);
    assert!(
        (value(&a) - want_a).abs() < 1e-14,
        "a = {}, want {want_a}",
        value(&a)
    );
    assert!(
        (value(&b) - want_b).abs() < 1e-14,
        "b = {}, want {want_b}",
        value(&b)
    );
    assert_eq!(value(&untouched), 5.0);
    let state: HashMap<String, Tensor> = opt.state_tensors().unwrap().into_iter().collect();
    let step = |k: &str| state[k].to_scalar::<i64>().unwrap();
    assert_eq!(step("group0.param0.step"), 1);
    assert_eq!(step("group0.param1.step"), 0);
    assert_eq!(step("group1.param0.step"), 1);

    // Four more steps with the lr scale at 1 match the reference recursion.
    for _ in 0..4 {
        opt.step(&linear_grads(&[(&a, 0.5), (&b, 3.0)])).unwrap();
    }
    let want_a = torch_adamw(1.0, 0.5, 0.1, 0.01, 5);
    let want_b = torch_adamw(-2.0, 3.0, 0.01, 0.0, 5);
    assert!(
        (value(&a) - want_a).abs() < 1e-13,
        "a = {}, want {want_a}",
        value(&a)
    );
    assert!(
        (value(&b) - want_b).abs() < 1e-13,
        "b = {}, want {want_b}",
        value(&b)
    );
}

#[test]
fn adamw_lr_scale_and_group_lr() {
    let a = scalar(1.0);
    let b = scalar(1.0);
    let mut opt = AdamW::new(
        vec![
            ParamGroup {
                vars: vec![a.clone()],
                lr: 0.1,
                weight_decay: 0.1,
            },
            ParamGroup {
                vars: vec![b.clone()],
                lr: 0.2,
                weight_decay: 0.0,
            },
        ],
        AdamWConfig::default(),
    )
    .unwrap();
    opt.set_lr_scale(0.5);
    assert_eq!(opt.lr_scale(), 0.5);
    opt.step(&linear_grads(&[(&a, -2.0), (&b, 1.0)])).unwrap();
    // Effective lrs 0.05 and 0.1.
    let want_a = (1.0 - 0.05 * 0.1) + 0.05 * 2.0 / (2.0 + 1e-8);
    let want_b = 1.0 - 0.1 * 1.0 / (1.0 + 1e-8);
    assert!((value(&a) - want_a).abs() < 1e-14);
    assert!((value(&b) - want_b).abs() < 1e-14);
    opt.set_group_lr(1, 0.4).unwrap();
    assert_eq!(opt.groups()[1].lr, 0.4);
    assert!(opt.set_group_lr(2, 0.4).is_err());
}

#[test]
fn adamw_state_round_trip_is_bit_exact() {
    let dev = Device::Cpu;
    let init_w = Tensor::new(&[[0.3f32, -1.2, 2.0], [0.7, 0.1, -0.4]], &dev).unwrap();
    let init_b = Tensor::new(&[0.05f32, -0.5], &dev).unwrap();
    let x = Tensor::new(&[[1.0f32, 2.0, -1.0], [0.5, -0.3, 0.8]], &dev).unwrap();
    let make = |w: &Tensor, b: &Tensor| {
        let w = Var::from_tensor(w).unwrap();
        let b = Var::from_tensor(b).unwrap();
        let opt = AdamW::new(
            vec![
                ParamGroup {
                    vars: vec![w.clone()],
                    lr: 1e-2,
                    weight_decay: 0.05,
                },
                ParamGroup {
                    vars: vec![b.clone()],
                    lr: 3e-3,
                    weight_decay: 0.0,
                },
            ],
            AdamWConfig::default(),
        )
        .unwrap();
        (w, b, opt)
    };
    let grads_of = |w: &Var, b: &Var| {
        let y = x
            .matmul(&w.as_tensor().t().unwrap())
            .unwrap()
            .broadcast_add(b.as_tensor())
            .unwrap();
        y.sqr().unwrap().sum_all().unwrap().backward().unwrap()
    };
    let (w1, b1, mut opt1) = make(&init_w, &init_b);
    for _ in 0..3 {
        opt1.step(&grads_of(&w1, &b1)).unwrap();
    }
    // Resume a fresh optimiser from the saved parameters and state.
    let saved: HashMap<String, Tensor> = opt1.state_tensors().unwrap().into_iter().collect();
    let (w2, b2, mut opt2) = make(
        &w1.as_tensor().copy().unwrap(),
        &b1.as_tensor().copy().unwrap(),
    );
    opt2.load_state(&saved).unwrap();
    for _ in 0..4 {
        opt1.step(&grads_of(&w1, &b1)).unwrap();
        opt2.step(&grads_of(&w2, &b2)).unwrap();
    }
    let bits = |t: &Tensor| -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };
    assert_eq!(bits(w1.as_tensor()), bits(w2.as_tensor()));
    assert_eq!(bits(b1.as_tensor()), bits(b2.as_tensor()));
    let s1 = opt1.state_tensors().unwrap();
    let s2 = opt2.state_tensors().unwrap();
    assert_eq!(s1.len(), 6);
    for ((k1, t1), (k2, t2)) in s1.iter().zip(&s2) {
        assert_eq!(k1, k2);
        if k1.ends_with(".step") {
            assert_eq!(t1.to_scalar::<i64>().unwrap(), 7);
            assert_eq!(t2.to_scalar::<i64>().unwrap(), 7);
        } else {
            assert_eq!(bits(t1), bits(t2), "{k1}");
        }
    }
}

#[test]
fn adamw_load_state_rejects_bad_state() {
    let w = scalar(1.0);
    let mut opt = AdamW::new(
        vec![ParamGroup {
            vars: vec![w],
            lr: 0.1,
            weight_decay: 0.0,
        }],
        AdamWConfig::default(),
    )
    .unwrap();
    let mut state: HashMap<String, Tensor> = opt.state_tensors().unwrap().into_iter().collect();
    assert!(opt.load_state(&state).is_ok());
    state.insert(
        "group0.param0.exp_avg".into(),
        Tensor::zeros(3, DType::F64, &Device::Cpu).unwrap(),
    );
    assert!(opt.load_state(&state).is_err(), "wrong shape accepted");
    state.remove("group0.param0.exp_avg");
    assert!(opt.load_state(&state).is_err(), "missing key accepted");
}

#[test]
fn clip_grad_norm_scales_to_max_norm() {
    let a = Var::from_tensor(&Tensor::zeros(3, DType::F64, &Device::Cpu).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::zeros(2, DType::F64, &Device::Cpu).unwrap()).unwrap();
    let no_grad = scalar(0.0);
    let vars = [a.clone(), b.clone(), no_grad];
    // grads: a = [3, 3, 3], b = [4, 4]; norm = sqrt(27 + 32) = sqrt(59).
    let grad_vec =
        |g: &GradStore, v: &Var| -> Vec<f64> { g.get(v.as_tensor()).unwrap().to_vec1().unwrap() };
    let mut grads = linear_grads(&[(&a, 3.0), (&b, 4.0)]);
    let norm = clip_grad_norm(&mut grads, &vars, 1.0).unwrap();
    assert!((norm - 59f64.sqrt()).abs() < 1e-12);
    let coef = 1.0 / (59f64.sqrt() + 1e-6);
    for (got, want) in grad_vec(&grads, &a).iter().zip([3.0 * coef; 3]) {
        assert!((got - want).abs() < 1e-14);
    }
    for (got, want) in grad_vec(&grads, &b).iter().zip([4.0 * coef; 2]) {
        assert!((got - want).abs() < 1e-14);
    }
    let clipped: f64 = [grad_vec(&grads, &a), grad_vec(&grads, &b)]
        .concat()
        .iter()
        .map(|g| g * g)
        .sum();
    assert!((clipped.sqrt() - 1.0).abs() < 1e-6);
    // Below the limit: unchanged.
    let mut grads = linear_grads(&[(&a, 3.0), (&b, 4.0)]);
    let norm = clip_grad_norm(&mut grads, &vars, 100.0).unwrap();
    assert!((norm - 59f64.sqrt()).abs() < 1e-12);
    assert_eq!(grad_vec(&grads, &a), vec![3.0; 3]);
    assert_eq!(grad_vec(&grads, &b), vec![4.0; 2]);
}

#[test]
fn cosine_schedule_values() {
    let s = CosineSchedule {
        warmup_steps: 10,
        total_steps: 110,
        min_ratio: 0.1,
    };
    let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
    assert_eq!(s.factor(0), 0.0);
    assert!(close(s.factor(5), 0.5));
    assert!(close(s.factor(10), 1.0), "warm-up end");
    assert!(close(s.factor(60), 0.55), "cosine midpoint");
    assert!(close(s.factor(110), 0.1), "end");
    assert!(close(s.factor(1000), 0.1), "after end");
    // Monotone decay after warm-up.
    assert!((10..110).all(|t| s.factor(t + 1) <= s.factor(t)));
    let no_warmup = CosineSchedule {
        warmup_steps: 0,
        total_steps: 4,
        min_ratio: 0.0,
    };
    assert!(close(no_warmup.factor(0), 1.0));
    assert!(close(no_warmup.factor(2), 0.5));
    assert!(close(no_warmup.factor(4), 0.0));
}
