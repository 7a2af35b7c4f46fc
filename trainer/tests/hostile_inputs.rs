//! Hostile inputs to the trainer: a checkpoint's `state.json` and the non-pixel sections of a
//! batch, mutated at random, give an error or a valid value, never a panic.

mod common;

use proptest::prelude::*;
use shared::batch::BatchView;
use trainer::checkpoint::{self, CheckpointManager, CheckpointPath};

fn saved_checkpoint(dir: &std::path::Path) -> CheckpointPath {
    let m = CheckpointManager::new(dir, 1).unwrap();
    let t = candle_core::Tensor::new(&[1.0f32, 2.0, 3.0], &candle_core::Device::Cpu).unwrap();
    let state = checkpoint::CheckpointState {
        format_version: checkpoint::FORMAT_VERSION,
        step: 3,
        epoch: 0,
        cursor: Default::default(),
        seed: 1,
        config_toml: common::TestConfig::micro(1).toml(),
        extra: serde_json::json!({"dataset_id": 5, "bad_records": [1, 2]}),
        files: Default::default(),
    };
    m.save(&[("w".to_string(), t)].into_iter().collect(), &state)
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, .. ProptestConfig::default() })]

    /// Overwritten bytes, a cut, or garbage in `state.json`: `verify` errs naming the file, or
    /// (an edit JSON tolerates, e.g. inside the config string) returns a state.
    #[test]
    fn mutated_state_json_never_panics(
        edits in prop::collection::vec((any::<u64>(), any::<u8>()), 0..8),
        cut in prop::option::of(any::<u64>()),
        garbage in prop::option::of(prop::collection::vec(any::<u8>(), 0..300)),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let c = saved_checkpoint(dir.path());
        let mut bytes = garbage.unwrap_or_else(|| std::fs::read(c.state()).unwrap());
        for (pos, val) in edits {
            if !bytes.is_empty() {
                let n = bytes.len() as u64;
                bytes[(pos % n) as usize] = val;
            }
        }
        if let Some(k) = cut {
            let n = bytes.len() as u64 + 1;
            bytes.truncate((k % n) as usize);
        }
        std::fs::write(c.state(), &bytes).unwrap();
        if let Err(e) = checkpoint::verify(&c) {
            let e = format!("{e:#}");
            prop_assert!(e.contains("state.json") || e.contains("tensors.safetensors"), "{}", e);
        }
    }

    /// Random values in the header, labels, indices, crop, mask, row-count, row and photometric
    /// sections of a batch: converting it errs or succeeds, never panics.
    #[test]
    fn mutated_batch_sections_never_panic(
        edits in prop::collection::vec((any::<u64>(), any::<u8>()), 1..24),
    ) {
        let cfg = common::micro_cfg();
        let (layout, mut buf) = trainer::data::synthetic_batch(&cfg.augment, 2, 9);
        let bytes = buf.bytes_mut();
        let sections = [
            0..layout.globals.start,
            layout.labels.start..layout.total,
        ];
        for (pos, val) in edits {
            let s = &sections[(pos % 2) as usize];
            let at = s.start + ((pos >> 1) % (s.end - s.start) as u64) as usize;
            bytes[at] = val;
        }
        if let Ok(view) = BatchView::new(&layout, buf.bytes()) {
            let _ = trainer::data::TrainBatch::from_view(&view, &cfg.augment, &candle_core::Device::Cpu);
        }
    }
}

/// A damaged file name inside `state.json` (a byte of "tensors.safetensors" overwritten, or a
/// path out of the checkpoint) is named as `state.json`'s damage, and nothing outside is read.
#[test]
fn a_damaged_file_name_in_state_json_is_blamed_on_state_json() {
    for bad in [" ensors.safetensors", "../state.json", "/etc/hostname"] {
        let dir = tempfile::tempdir().unwrap();
        let c = saved_checkpoint(dir.path());
        let text = std::fs::read_to_string(c.state()).unwrap();
        assert!(text.contains("\"tensors.safetensors\""), "{text}");
        let text = text.replace("\"tensors.safetensors\"", &format!("{bad:?}"));
        std::fs::write(c.state(), text).unwrap();
        let e = format!("{:#}", checkpoint::verify(&c).unwrap_err());
        assert!(e.contains("state.json"), "{bad}: {e}");
    }
}
