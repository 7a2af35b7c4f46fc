use std::path::Path;

use proptest::prelude::*;

use super::*;

fn options() -> PackOptions {
    PackOptions {
        encoding: Encoding::Jpeg,
        max_side: None,
        quality: None,
        shard_bytes: 300,
        validate: false,
        layout: "imagefolder".into(),
    }
}

fn payload(i: u64) -> Vec<u8> {
    (0..(i * 37 % 97 + 1))
        .map(|j| (i * 31 + j * 7) as u8)
        .collect()
}

/// Writes `n` synthetic records (labels cycle over 3 classes, every 5th unlabelled).
fn write_dataset(dir: &Path, n: u64, shard_bytes: u64) -> Manifest {
    let mut w = DatasetWriter::new(dir, shard_bytes);
    for i in 0..n {
        let p = payload(i);
        let path = format!("class_{}/ïmg_{i}.jpg", i % 3);
        w.push(&NewRecord {
            label: if i % 5 == 4 {
                UNLABELLED
            } else {
                (i % 3) as i32
            },
            width: 10 + i as u32,
            height: 20 + i as u32,
            encoding: Encoding::from_u8((i % 3) as u8).unwrap(),
            payload: &p,
            path: &path,
        })
        .unwrap();
    }
    let classes = vec!["a".to_string(), "b".into(), "c".into()];
    w.finish(
        classes,
        PackOptions {
            shard_bytes,
            ..options()
        },
        vec![],
    )
    .unwrap()
}

#[test]
fn round_trip_every_field() {
    let dir = tempfile::tempdir().unwrap();
    let m = write_dataset(dir.path(), 40, 300);
    assert!(m.shards.len() > 3, "300-byte shards must split 40 records");
    let ds = Dataset::open(dir.path()).unwrap();
    assert_eq!(ds.len(), 40);
    assert_eq!(ds.class_names(), ["a", "b", "c"]);
    let mut counts = [0u64; 3];
    for i in 0..40 {
        let r = ds.record_checked(i).unwrap();
        assert_eq!(r.index, i);
        assert_eq!(r.payload, &payload(i)[..]);
        assert_eq!(r.path, format!("class_{}/ïmg_{i}.jpg", i % 3));
        assert_eq!((r.width, r.height), (10 + i as u32, 20 + i as u32));
        assert_eq!(r.encoding as u8, (i % 3) as u8);
        assert_eq!(ds.shard_file(r.shard), m.shards[r.shard as usize].file);
        if i % 5 == 4 {
            assert_eq!(r.label, UNLABELLED);
        } else {
            counts[r.label as usize] += 1;
        }
    }
    assert_eq!(m.class_counts, counts);
    assert_eq!(m.unlabelled, 8);
    // Shards respect the target unless one record alone exceeds it; none straddles.
    for s in &m.shards {
        assert!(s.payload_bytes <= 300 || s.records == 1);
    }
    assert!(matches!(
        ds.record(40),
        Err(ShardError::OutOfRange { index: 40, len: 40 })
    ));
}

#[test]
fn same_records_same_bytes_and_id() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_dataset(a.path(), 25, 200);
    write_dataset(b.path(), 25, 200);
    for name in std::fs::read_dir(a.path()).unwrap() {
        let name = name.unwrap().file_name();
        assert_eq!(
            std::fs::read(a.path().join(&name)).unwrap(),
            std::fs::read(b.path().join(&name)).unwrap()
        );
    }
    let (da, db) = (
        Dataset::open(a.path()).unwrap(),
        Dataset::open(b.path()).unwrap(),
    );
    assert_eq!(da.dataset_id(), db.dataset_id());
    let c = tempfile::tempdir().unwrap();
    write_dataset(c.path(), 24, 200);
    assert_ne!(
        Dataset::open(c.path()).unwrap().dataset_id(),
        da.dataset_id()
    );
}

#[test]
fn empty_dataset_opens() {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path(), 0, 100);
    let ds = Dataset::open(dir.path()).unwrap();
    assert_eq!(ds.len(), 0);
    assert!(ds.record(0).is_err());
}

#[test]
fn flipped_payload_byte_names_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let m = write_dataset(dir.path(), 10, 1 << 20);
    let ds = Dataset::open(dir.path()).unwrap();
    let r = ds.record(7).unwrap();
    let at =
        r.payload.as_ptr() as usize - ds.record(0).unwrap().payload.as_ptr() as usize + HEADER_LEN;
    drop(ds);
    let file = dir.path().join(&m.shards[0].file);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[at + 1] ^= 0x40;
    std::fs::write(&file, bytes).unwrap();
    let ds = Dataset::open(dir.path()).unwrap();
    let err = ds.record_checked(7).unwrap_err();
    assert!(matches!(err, ShardError::Checksum { index: 7, .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("record 7") && msg.contains("shard-00000.bin") && msg.contains("ïmg_7.jpg"),
        "{msg}"
    );
    for i in (0..10).filter(|&i| i != 7) {
        ds.record_checked(i).unwrap();
    }
}

#[test]
fn truncated_shard_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let m = write_dataset(dir.path(), 10, 1 << 20);
    let file = dir.path().join(&m.shards[0].file);
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 3]).unwrap();
    let msg = Dataset::open(dir.path()).err().unwrap().to_string();
    assert!(
        msg.contains("shard-00000.bin") && msg.contains("truncated"),
        "{msg}"
    );
}

/// Reads everything the reader offers; returns whether any error was seen. Must never panic.
fn read_all(dir: &Path) -> bool {
    let Ok(ds) = Dataset::open(dir) else {
        return true;
    };
    let mut err = false;
    for i in 0..ds.len().min(10_000) {
        err |= ds.record(i).is_err();
        err |= ds.record_checked(i).is_err();
    }
    err |= ds.record(ds.len()).is_ok();
    err
}

fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, .. ProptestConfig::default() })]

    /// Any single changed byte in a shard file is detected (open, record or CRC), never a panic.
    #[test]
    fn any_flipped_shard_byte_is_detected(seed_shard in 0usize..8, pos in any::<u64>(), xor in 1u8..=255) {
        let base = tempfile::tempdir().unwrap();
        let m = write_dataset(base.path(), 12, 200);
        let file = base.path().join(&m.shards[seed_shard % m.shards.len()].file);
        let mut bytes = std::fs::read(&file).unwrap();
        let at = (pos % bytes.len() as u64) as usize;
        bytes[at] ^= xor;
        std::fs::write(&file, bytes).unwrap();
        prop_assert!(read_all(base.path()), "flip at {} of {} went unnoticed", at, file.display());
    }

    /// Random edits (overwrites, truncation, extension, garbage files) never panic the reader.
    #[test]
    fn mutated_shards_never_panic(
        edits in prop::collection::vec((any::<u64>(), any::<u8>()), 0..16),
        cut in prop::option::of(any::<u64>()),
        garbage in prop::option::of(prop::collection::vec(any::<u8>(), 0..400)),
        target in 0usize..4,
    ) {
        let src = tempfile::tempdir().unwrap();
        let m = write_dataset(src.path(), 9, 150);
        let dir = tempfile::tempdir().unwrap();
        copy_dir(src.path(), dir.path());
        let name = if target == 3 { MANIFEST_FILE.to_string() } else { m.shards[target % m.shards.len()].file.clone() };
        let file = dir.path().join(name);
        let mut bytes = match garbage {
            Some(g) => g,
            None => std::fs::read(&file).unwrap(),
        };
        for (pos, val) in edits {
            if !bytes.is_empty() {
                let n = bytes.len();
                bytes[(pos % n as u64) as usize] = val;
            }
        }
        if let Some(c) = cut {
            let n = bytes.len() as u64 + 1;
            bytes.truncate((c % n) as usize);
        }
        std::fs::write(&file, bytes).unwrap();
        read_all(dir.path());
    }
}

#[test]
fn dataset_is_shareable_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Dataset>();
}
