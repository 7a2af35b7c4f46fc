//! Crop-geometry invariants of udi-spec §1.3 over many seeds.

use loader::crops::{local_reference, sample_crops, CropSampler, PixBox};
use shared::config::AugmentConfig;
use shared::geometry::CropMeta;
use shared::rng::sample_rng;

fn inter_over_min(a: &CropMeta, b: &CropMeta) -> f64 {
    let r0 = a.top.max(b.top) as f64;
    let r1 = ((a.top + a.h).min(b.top + b.h)) as f64;
    let c0 = a.left.max(b.left) as f64;
    let c1 = ((a.left + a.w).min(b.left + b.w)) as f64;
    let inter = (r1 - r0).max(0.0) * (c1 - c0).max(0.0);
    inter / ((a.h * a.w).min(b.h * b.w)) as f64
}

fn quantile(mut v: Vec<f64>, q: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * q) as usize]
}

#[test]
fn crops_in_bounds_with_scale_and_aspect_in_range() {
    let aug = AugmentConfig::default();
    let (hh, ww) = (375u32, 500u32);
    let area = (hh * ww) as f64;
    for seed in 0..400u64 {
        let crops = sample_crops(&aug, hh, ww, &mut sample_rng(seed, 0, 0));
        assert_eq!(crops.len(), 12);
        for (k, c) in crops.iter().enumerate() {
            assert_eq!((c.img_h, c.img_w), (hh, ww));
            assert!(
                c.h >= 1 && c.w >= 1 && c.top + c.h <= hh && c.left + c.w <= ww,
                "{c:?}"
            );
            let scale = if k < 2 {
                aug.global_scale
            } else {
                aug.local_scale
            };
            let frac = (c.h * c.w) as f64 / area;
            // w and h are rounded to integers: allow a little slack around the sampled area.
            assert!(
                frac >= scale[0] * 0.97 && frac <= scale[1] * 1.03,
                "crop {k} area {frac} {c:?}"
            );
            let aspect = c.w as f64 / c.h as f64;
            assert!(
                (0.75 * 0.97..=4.0 / 3.0 * 1.03).contains(&aspect),
                "crop {k} aspect {aspect}"
            );
            assert!(c.hflip <= 1);
        }
    }
}

#[test]
fn flips_are_encoded_in_the_signed_box() {
    let aug = AugmentConfig::default();
    let mut flipped = 0;
    let mut total = 0;
    for seed in 0..300u64 {
        for c in sample_crops(&aug, 300, 400, &mut sample_rng(seed, 1, 0)) {
            let b = c.signed_box();
            assert!(b[0] < b[2]);
            assert_eq!(c.hflip == 1, b[1] > b[3], "{c:?} {b:?}");
            flipped += c.hflip as usize;
            total += 1;
        }
    }
    let rate = flipped as f64 / total as f64;
    assert!((0.45..0.55).contains(&rate), "flip rate {rate}");
}

#[test]
fn local_flip_flag_d9() {
    let aug = AugmentConfig {
        local_hflip: false,
        ..Default::default()
    };
    for seed in 0..100u64 {
        let crops = sample_crops(&aug, 300, 400, &mut sample_rng(seed, 0, 0));
        assert!(crops[2..].iter().all(|c| c.hflip == 0));
    }
}

#[test]
fn global_overlap_statistics_match_the_spec() {
    // Official behaviour (D4 typo): median ≈ 0.89, 1st percentile ≈ 0.41, ~0.1 % below 0.25.
    let n = 4000u64;
    let stats = |aug: &AugmentConfig| -> Vec<f64> {
        (0..n)
            .map(|s| {
                let c = sample_crops(aug, 375, 500, &mut sample_rng(7, 0, s));
                inter_over_min(&c[0], &c[1])
            })
            .collect()
    };
    let official = stats(&AugmentConfig {
        n_local: 0,
        ..Default::default()
    });
    let med = quantile(official.clone(), 0.5);
    let p1 = quantile(official.clone(), 0.01);
    assert!((0.84..0.94).contains(&med), "median {med}");
    assert!((0.3..0.55).contains(&p1), "p1 {p1}");
    let below = official.iter().filter(|&&x| x < 0.25).count() as f64 / n as f64;
    assert!(below < 0.01, "{below}");

    let fixed = stats(&AugmentConfig {
        n_local: 0,
        fix_overlap_typo: true,
        ..Default::default()
    });
    let min = fixed.iter().cloned().fold(1.0, f64::min);
    assert!(min >= 0.25, "with the D4 fix the minimum overlap is {min}");
}

#[test]
fn panorama_falls_back_to_the_centre_crop() {
    // 1000×100 with global scale ≥ 0.25: no attempt can fit (needs aspect ≥ 2.5), so the
    // fallback crop h = 100, w = round(100·4/3) = 133 at j = (1000 − 133) // 2 = 433.
    let aug = AugmentConfig::default();
    for seed in 0..50u64 {
        let c = sample_crops(&aug, 100, 1000, &mut sample_rng(seed, 0, 0));
        assert_eq!((c[0].top, c[0].left, c[0].h, c[0].w), (0, 433, 100, 133));
        // View 1 has the same fallback size; only its position may move toward view 0.
        assert_eq!((c[1].h, c[1].w), (100, 133));
        assert!(c[1].left + c[1].w <= 1000);
    }
    // Tall panorama: w = W, h = round(W / (3/4)).
    let s = CropSampler {
        height: 1000,
        width: 100,
        scale: [0.25, 1.0],
        ratio: [0.75, 4.0 / 3.0],
        fix_overlap_typo: false,
    };
    let r = s.centre_fallback();
    assert_eq!((r.i, r.j, r.h, r.w), ((1000 - 133) / 2, 0, 133, 100));
}

#[test]
fn local_reference_box_d3() {
    // View 0 rows 10..50, cols 20..80; view 1 rows 30..90, cols 60..120 (pixel units).
    let g0 = PixBox {
        r0: 10,
        c0: 20,
        r1: 50,
        c1: 80,
    };
    let g1 = PixBox {
        r0: 30,
        c0: 60,
        r1: 90,
        c1: 120,
    };
    // No flips: the union.
    assert_eq!(
        local_reference(g0, g1, false),
        PixBox {
            r0: 10,
            c0: 20,
            r1: 90,
            c1: 120
        }
    );
    // Both flipped: columns become the intersection after un-flipping.
    let f0 = PixBox {
        c0: 80,
        c1: 20,
        ..g0
    };
    let f1 = PixBox {
        c0: 120,
        c1: 60,
        ..g1
    };
    assert_eq!(
        local_reference(f0, f1, false).unflipped(),
        PixBox {
            r0: 10,
            c0: 60,
            r1: 90,
            c1: 80
        }
    );
    // One flipped: the mixed range (min(J0, j1), max(j0, J1)).
    assert_eq!(
        local_reference(f0, g1, false).unflipped(),
        PixBox {
            r0: 10,
            c0: 60,
            r1: 90,
            c1: 120
        }
    );
    // The fix: the true intersection whatever the flips.
    let inter = PixBox {
        r0: 30,
        c0: 60,
        r1: 50,
        c1: 80,
    };
    assert_eq!(local_reference(g0, g1, true), inter);
    assert_eq!(local_reference(f0, g1, true), inter);
}

#[test]
fn local_crops_overlap_the_reference_region() {
    // Locals are pushed to overlap the reference box by ~half their side on each axis (with
    // the D4 fix; the typo applies to locals too).
    let aug = AugmentConfig {
        fix_overlap_typo: true,
        ..Default::default()
    };
    let mut inside = Vec::new();
    for seed in 0..500u64 {
        let c = sample_crops(&aug, 375, 500, &mut sample_rng(seed, 3, 0));
        let reference = local_reference(PixBox::of(&c[0]), PixBox::of(&c[1]), false).unflipped();
        let rm = CropMeta {
            img_h: 375,
            img_w: 500,
            top: reference.r0 as u32,
            left: reference.c0 as u32,
            h: (reference.r1 - reference.r0 + 1) as u32,
            w: (reference.c1 - reference.c0 + 1) as u32,
            hflip: 0,
        };
        for l in &c[2..] {
            inside.push(inter_over_min(l, &rm));
        }
    }
    let min = inside.iter().cloned().fold(1.0, f64::min);
    assert!(
        min >= 0.2,
        "min overlap of a local with its reference {min}"
    );
}
