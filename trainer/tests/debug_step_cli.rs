//! `init-weights` → `make-batch` → `debug-step` through the binary: outputs are complete,
//! deterministic, and agree with the library step.
mod common;
use candle_core::{DType, Device};
use std::process::Command;

fn run(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn debug_step_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let cfg_path = common::repo_path("configs/tiny.toml");
    let cfg_s = cfg_path.to_str().unwrap();
    run(&[
        "init-weights",
        "--config",
        cfg_s,
        "--out",
        &p("w.safetensors"),
    ]);
    run(&[
        "make-batch",
        "--config",
        cfg_s,
        "--synthetic",
        "--batch-size",
        "2",
        "--seed",
        "4",
        "--out",
        &p("b.safetensors"),
    ]);
    for r in ["r1", "r2"] {
        run(&[
            "debug-step",
            "--config",
            cfg_s,
            "--weights",
            &p("w.safetensors"),
            "--batch",
            &p("b.safetensors"),
            "--out",
            &p(&format!("{r}.json")),
            "--iters-per-epoch",
            "10",
        ]);
    }
    // The other engine on the same inputs: the same step to f32 rounding.
    let other = match trainer::engine::EngineKind::for_device(&Device::Cpu, None) {
        trainer::engine::EngineKind::Explicit => "autograd",
        trainer::engine::EngineKind::Autograd => "explicit",
    };
    run(&[
        "debug-step",
        "--config",
        cfg_s,
        "--weights",
        &p("w.safetensors"),
        "--batch",
        &p("b.safetensors"),
        "--out",
        &p("other.json"),
        "--iters-per-epoch",
        "10",
        "--engine",
        other,
    ]);
    let j1 = std::fs::read_to_string(p("r1.json")).unwrap();
    let jo: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p("other.json")).unwrap()).unwrap();
    assert_eq!(jo["engine"], other);
    let json: serde_json::Value = serde_json::from_str(&j1).unwrap();
    for k in ["loss", "loss_cls", "loss_udi", "loss_patch", "grad_norm"] {
        let (a, b) = (json[k].as_f64().unwrap(), jo[k].as_f64().unwrap());
        assert!(
            (a - b).abs() <= 1e-5 * b.abs(),
            "{k}: {a} vs {b} ({other} engine)"
        );
    }
    for k in [
        "loss",
        "loss_cls",
        "loss_udi",
        "loss_patch",
        "lr",
        "teacher_temp",
        "centres",
        "grad_norms",
    ] {
        assert!(json.get(k).is_some(), "missing {k}");
    }
    let t1 = candle_core::safetensors::load(p("r1.safetensors"), &Device::Cpu).unwrap();
    let t2 = candle_core::safetensors::load(p("r2.safetensors"), &Device::Cpu).unwrap();
    let cfg = common::tiny_cfg();
    let n_params = trainer::params::param_specs(&cfg).len();
    assert_eq!(
        t1.keys().filter(|k| k.starts_with("student.")).count(),
        n_params
    );
    assert_eq!(
        t1.keys().filter(|k| k.starts_with("teacher.")).count(),
        n_params
    );
    assert!(t1.contains_key("center.patch") && t1.contains_key("optim.backbone.pos_embed.exp_avg"));
    // Epoch 0: the last layer is frozen, so it has no Adam state and a null post-clip norm.
    assert!(!t1.contains_key("optim.head.last_layer.weight_v.exp_avg"));
    let gl: Vec<_> = json["grad_norms"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["name"] == "head.last_layer.weight_v")
        .collect();
    assert!(gl[0]["post_clip"].is_null() && gl[0]["pre_clip"].as_f64().unwrap() > 0.0);
    // Deterministic (apart from the wall-clock timings).
    let strip = |t: &str| {
        let mut v: serde_json::Value = serde_json::from_str(t).unwrap();
        v.as_object_mut().unwrap().remove("timings");
        v
    };
    assert_eq!(
        strip(&j1),
        strip(&std::fs::read_to_string(p("r2.json")).unwrap())
    );
    for (k, v) in &t1 {
        assert_eq!(common::to_vec_f64(v), common::to_vec_f64(&t2[k]), "{k}");
    }
    // The library step on the same inputs gives the same loss.
    let w = candle_core::safetensors::load(p("w.safetensors"), &Device::Cpu).unwrap();
    let b = candle_core::safetensors::load(p("b.safetensors"), &Device::Cpu).unwrap();
    let tb =
        trainer::data::batch_from_file_tensors(&b, &cfg.augment, DType::F32, &Device::Cpu, "b")
            .unwrap();
    // (The CLI's default engine and precision for the CPU, as debug-step picks them.)
    let dev = Device::Cpu;
    let engine = trainer::engine::EngineKind::for_device(&dev, None);
    let compute = trainer::kernels::Compute::for_device(&dev, None, None);
    let mut tr = trainer::step::build(engine, &cfg, 10, &dev, DType::F32, compute).unwrap();
    tr.set_drop_path(false);
    let mut state = w.clone();
    for k in ["center.cls", "center.udi", "center.patch"] {
        state.insert(k.to_string(), b[k].clone());
    }
    tr.load_state(&state, "w").unwrap();
    let s = tr.step(&tb, 0, 0).unwrap();
    assert_eq!(s.loss, json["loss"].as_f64().unwrap());
}
