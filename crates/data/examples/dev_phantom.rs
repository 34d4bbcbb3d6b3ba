use sam2rad_data::phantom::*;
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let seed: u64 = args.get(1).map(|s| s.parse().unwrap()).unwrap_or(1);
    let n: u64 = args.get(2).map(|s| s.parse().unwrap()).unwrap_or(6);
    let mut cfg = PhantomConfig::default();
    cfg.classes = vec![PhantomClass::Bone, PhantomClass::Bursa];
    cfg.empty_fraction = 0.0;
    std::fs::create_dir_all("/tmp/phantom_dev").unwrap();
    let t = std::time::Instant::now();
    let mut dices = vec![];
    let mut px = 0usize;
    for i in 0..n {
        let p = render(seed, i, &cfg);
        px += p.width * p.height;
        let mut v = p.image.clone();
        v.sort_unstable();
        let thr = v[((v.len() as f64) * 0.97) as usize];
        let (mut inter, mut a, mut b) = (0usize, 0usize, 0usize);
        for (g, m) in p.image.iter().zip(&p.mask) {
            let pr = *g > thr;
            let gt = *m == 1;
            inter += (pr && gt) as usize; a += pr as usize; b += gt as usize;
        }
        if b > 0 { dices.push(2.0 * inter as f64 / (a + b) as f64); }
        if i < 8 {
            // side by side: grey | overlay
            let (w, h) = (p.width, p.height);
            let mut buf = vec![0u8; h * w * 2 * 3];
            for y in 0..h { for x in 0..w {
                let g = p.image[y*w+x];
                let o = (y*2*w + x)*3; buf[o]=g;buf[o+1]=g;buf[o+2]=g;
                let o2 = (y*2*w + w + x)*3;
                let (r,gg,bb) = match p.mask[y*w+x] {1=>(255,(g/2),0),2=>(0,(g/2),255),_=>(g,g,g)};
                buf[o2]=r;buf[o2+1]=gg;buf[o2+2]=bb;
            }}
            image::save_buffer(format!("/tmp/phantom_dev/g{seed}_{i}.png"), &p.image, w as u32, h as u32, image::ExtendedColorType::L8).unwrap();
            image::save_buffer(format!("/tmp/phantom_dev/s{seed}_{i}.png"), &buf, (2*w) as u32, h as u32, image::ExtendedColorType::Rgb8).unwrap();
        }
    }
    let el = t.elapsed().as_secs_f64();
    let mean = dices.iter().sum::<f64>() / dices.len() as f64;
    let max = dices.iter().cloned().fold(0.0, f64::max);
    println!("{} imgs, {:.2} ms/img, {:.2} ms per 512x384; thr dice mean {:.3} max {:.3}", n, el*1e3/n as f64, el*1e3/(px as f64/(512.0*384.0)), mean, max);
}
