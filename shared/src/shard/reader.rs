//! [`Dataset`]: a packed directory, memory-mapped, with O(1) bounds-checked record access.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use memmap2::Mmap;

use super::format::{Entry, Header, PathTable, ENTRY_LEN, HEADER_LEN, VERSION};
use super::manifest::{Manifest, MANIFEST_FILE};
use super::{RecordRef, ShardError, UNLABELLED};

/// Longest relative path the reader accepts when sizing a path table (Linux PATH_MAX).
const MAX_PATH_LEN: u64 = 4096;

struct Shard {
    file: String,
    map: Mmap,
    header: Header,
    paths: OnceLock<Result<PathTable, String>>,
}

impl Shard {
    fn corrupt(&self, msg: impl Into<String>) -> ShardError {
        ShardError::Corrupt {
            file: self.file.clone(),
            msg: msg.into(),
        }
    }

    /// Maps and checks one shard against its manifest entry: header, layout, index CRC.
    fn open(dir: &Path, id: u32, info: &super::ShardInfo) -> Result<Shard, ShardError> {
        if info.file.contains('/') || info.file.contains('\\') || info.file.starts_with('.') {
            return Err(ShardError::Manifest {
                path: dir.join(MANIFEST_FILE),
                msg: format!("shard file name {:?} is not a plain file name", info.file),
            });
        }
        let path = dir.join(&info.file);
        let f = File::open(&path).map_err(|e| ShardError::io(&path, e))?;
        // SAFETY: shard files are immutable once packed; the map is read-only. Another process
        // truncating the file while it is mapped would be a SIGBUS, as with any mmap reader.
        let map = unsafe { Mmap::map(&f) }.map_err(|e| ShardError::io(&path, e))?;
        let corrupt = |msg: String| ShardError::Corrupt {
            file: info.file.clone(),
            msg,
        };
        let header = Header::decode(&map).map_err(corrupt)?;
        let file_len = map.len() as u64;
        if header.shard_id != id
            || header.first_index != info.first_index
            || header.record_count != info.records
        {
            return Err(corrupt(format!(
                "header says shard {} with records {}..+{}, manifest says shard {id} with {}..+{}",
                header.shard_id,
                header.first_index,
                header.record_count,
                info.first_index,
                info.records
            )));
        }
        let index_end = header
            .record_count
            .checked_mul(ENTRY_LEN as u64)
            .and_then(|n| n.checked_add(header.index_offset));
        let meta_end = header.meta_offset.checked_add(header.meta_len as u64);
        if header.index_offset < HEADER_LEN as u64
            || index_end != Some(header.meta_offset)
            || meta_end != Some(file_len)
        {
            return Err(corrupt(format!(
                "layout does not fit the file (index at {}, {} records, path table at {}+{}, file is {file_len} bytes): truncated or corrupt",
                header.index_offset, header.record_count, header.meta_offset, header.meta_len
            )));
        }
        if file_len != info.file_bytes {
            return Err(corrupt(format!(
                "file is {file_len} bytes, manifest says {}",
                info.file_bytes
            )));
        }
        let index = &map[header.index_offset as usize..header.meta_offset as usize];
        let crc = crc32c::crc32c(index);
        if crc != header.index_crc {
            return Err(corrupt(format!(
                "index CRC32C mismatch ({:08x} stored, {crc:08x} computed)",
                header.index_crc
            )));
        }
        Ok(Shard {
            file: info.file.clone(),
            map,
            header,
            paths: OnceLock::new(),
        })
    }

    fn entry(&self, local: u64) -> Entry {
        let at = self.header.index_offset as usize + local as usize * ENTRY_LEN;
        Entry::decode(&self.map[at..at + ENTRY_LEN])
    }

    fn paths(&self) -> Result<&PathTable, ShardError> {
        let table = self.paths.get_or_init(|| {
            let h = &self.header;
            let meta = &self.map[h.meta_offset as usize..];
            let crc = crc32c::crc32c(meta);
            if crc != h.meta_crc {
                return Err(format!(
                    "path table CRC32C mismatch ({:08x} stored, {crc:08x} computed)",
                    h.meta_crc
                ));
            }
            // A lying length must not become a huge allocation.
            let cap = h.record_count.saturating_mul(4 + MAX_PATH_LEN);
            if h.meta_raw_len as u64 > cap {
                return Err(format!(
                    "path table claims {} bytes for {} records",
                    h.meta_raw_len, h.record_count
                ));
            }
            let raw = zstd::bulk::decompress(meta, h.meta_raw_len as usize)
                .map_err(|e| format!("path table does not decompress: {e}"))?;
            if raw.len() != h.meta_raw_len as usize {
                return Err(format!(
                    "path table is {} bytes, header says {}",
                    raw.len(),
                    h.meta_raw_len
                ));
            }
            PathTable::decode(raw, h.record_count as usize)
        });
        table.as_ref().map_err(|msg| self.corrupt(msg.clone()))
    }
}

/// A packed dataset directory, memory-mapped. `Send + Sync`: share it between threads by reference.
pub struct Dataset {
    dir: PathBuf,
    manifest: Manifest,
    shards: Vec<Shard>,
    /// `first_index` of each shard, ascending (for the shard lookup).
    starts: Vec<u64>,
    id: u64,
}

impl Dataset {
    /// Reads the manifest, maps every shard and checks headers, layout and index checksums.
    pub fn open(dir: &Path) -> Result<Dataset, ShardError> {
        let mpath = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&mpath).map_err(|e| ShardError::io(&mpath, e))?;
        let bad = |msg: String| ShardError::Manifest {
            path: mpath.clone(),
            msg,
        };
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if manifest.format != "udi-shards" || manifest.version != VERSION {
            return Err(bad(format!(
                "format {:?} version {}, expected \"udi-shards\" version {VERSION}",
                manifest.format, manifest.version
            )));
        }
        if manifest.class_counts.len() != manifest.classes.len() {
            return Err(bad("class_counts and classes differ in length".into()));
        }
        let mut next = 0u64;
        for s in &manifest.shards {
            if s.first_index != next || s.records == 0 {
                return Err(bad(format!(
                    "shard {} does not start at record {next} or is empty",
                    s.file
                )));
            }
            next = next
                .checked_add(s.records)
                .ok_or_else(|| bad("record counts overflow".into()))?;
        }
        if next != manifest.records {
            return Err(bad(format!(
                "shards hold {next} records, manifest says {}",
                manifest.records
            )));
        }
        let shards = manifest
            .shards
            .iter()
            .enumerate()
            .map(|(i, info)| Shard::open(dir, i as u32, info))
            .collect::<Result<Vec<_>, _>>()?;
        let starts = manifest.shards.iter().map(|s| s.first_index).collect();
        let id = manifest.fingerprint();
        Ok(Dataset {
            dir: dir.to_path_buf(),
            manifest,
            shards,
            starts,
            id,
        })
    }

    pub fn len(&self) -> u64 {
        self.manifest.records
    }

    pub fn is_empty(&self) -> bool {
        self.manifest.records == 0
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn class_names(&self) -> &[String] {
        &self.manifest.classes
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Stable fingerprint of the manifest (equal manifests, equal ids).
    pub fn dataset_id(&self) -> u64 {
        self.id
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// File name of shard `s`.
    pub fn shard_file(&self, s: u32) -> &str {
        &self.shards[s as usize].file
    }

    /// Record `index`: O(1), bounds-checked; does not verify the payload CRC (see
    /// [`record_checked`](Self::record_checked)).
    pub fn record(&self, index: u64) -> Result<RecordRef<'_>, ShardError> {
        if index >= self.len() {
            return Err(ShardError::OutOfRange {
                index,
                len: self.len(),
            });
        }
        let s = self.starts.partition_point(|&start| start <= index) - 1;
        let shard = &self.shards[s];
        let local = index - shard.header.first_index;
        let e = shard.entry(local);
        let paths = shard.paths()?;
        let path = paths.get(local as usize);
        let bad = |msg: String| ShardError::BadRecord {
            index,
            file: shard.file.clone(),
            path: path.to_string(),
            msg,
        };
        let encoding = e
            .encoding()
            .ok_or_else(|| bad(format!("unknown encoding byte {}", e.encoding)))?;
        let end = e.offset.checked_add(e.len as u64);
        if e.offset < HEADER_LEN as u64 || end.is_none_or(|end| end > shard.header.index_offset) {
            return Err(bad(format!(
                "payload {}+{} lies outside the payload area {}..{}",
                e.offset, e.len, HEADER_LEN, shard.header.index_offset
            )));
        }
        if e.label < UNLABELLED || (e.label >= 0 && e.label as usize >= self.manifest.classes.len())
        {
            return Err(bad(format!(
                "label {} outside 0..{}",
                e.label,
                self.manifest.classes.len()
            )));
        }
        Ok(RecordRef {
            index,
            label: e.label,
            width: e.width,
            height: e.height,
            encoding,
            payload: &shard.map[e.offset as usize..end.unwrap() as usize],
            path,
            shard: s as u32,
            crc32c: e.crc,
        })
    }

    /// Like [`record`](Self::record), and also checks the payload's CRC32C.
    pub fn record_checked(&self, index: u64) -> Result<RecordRef<'_>, ShardError> {
        let rec = self.record(index)?;
        let actual = crc32c::crc32c(rec.payload);
        if actual != rec.crc32c {
            return Err(ShardError::Checksum {
                index,
                file: self.shards[rec.shard as usize].file.clone(),
                path: rec.path.to_string(),
                expected: rec.crc32c,
                actual,
            });
        }
        Ok(rec)
    }
}
