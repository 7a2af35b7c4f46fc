//! Writing shards: [`ShardWriter`] writes one file, [`DatasetWriter`] splits records into shards
//! and writes the manifest. Output depends only on the records pushed, in order.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::format::{encode_paths, Entry, Header, ENTRY_LEN, HEADER_LEN, VERSION};
use super::manifest::{Manifest, PackOptions, ShardInfo, SkippedFile, MANIFEST_FILE};
use super::{Encoding, ShardError, UNLABELLED};

/// zstd level of the path table (small, written once).
const META_ZSTD_LEVEL: i32 = 19;

/// File name of shard `id`.
pub fn shard_file_name(id: u32) -> String {
    format!("shard-{id:05}.bin")
}

/// A record to append.
#[derive(Clone, Copy, Debug)]
pub struct NewRecord<'a> {
    pub label: i32,
    pub width: u32,
    pub height: u32,
    pub encoding: Encoding,
    pub payload: &'a [u8],
    /// Relative path, `/`-separated.
    pub path: &'a str,
}

/// Writes one shard file: payloads stream to disk, index and path table are written at `finish`.
pub struct ShardWriter {
    out: BufWriter<File>,
    path: PathBuf,
    shard_id: u32,
    first_index: u64,
    pos: u64,
    entries: Vec<u8>,
    paths: Vec<String>,
    fsync: bool,
    /// Bytes up to which writeback has been started (see `start_writeback`).
    flushed: u64,
}

/// With fsync on, start writeback of every this many written bytes, so that the final fsync
/// does not wait for the whole shard at once.
const WRITEBACK_CHUNK: u64 = 8 << 20;

impl ShardWriter {
    pub fn create(path: &Path, shard_id: u32, first_index: u64) -> Result<ShardWriter, ShardError> {
        let file = File::create(path).map_err(|e| ShardError::io(path, e))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        // Placeholder; the real header is written by `finish`.
        out.write_all(&[0u8; HEADER_LEN])
            .map_err(|e| ShardError::io(path, e))?;
        Ok(ShardWriter {
            out,
            path: path.to_path_buf(),
            shard_id,
            first_index,
            pos: HEADER_LEN as u64,
            entries: Vec::new(),
            paths: Vec::new(),
            fsync: true,
            flushed: 0,
        })
    }

    /// Whether `finish` fsyncs the file (default true: durable before the pack's final rename).
    pub fn with_fsync(mut self, on: bool) -> ShardWriter {
        self.fsync = on;
        self
    }

    pub fn len(&self) -> u64 {
        self.paths.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    pub fn payload_bytes(&self) -> u64 {
        self.pos - HEADER_LEN as u64
    }

    pub fn push(&mut self, rec: &NewRecord) -> Result<(), ShardError> {
        let len = u32::try_from(rec.payload.len()).map_err(|_| {
            ShardError::Invalid(format!(
                "{}: payload of {} bytes exceeds 4 GiB",
                rec.path,
                rec.payload.len()
            ))
        })?;
        let entry = Entry {
            offset: self.pos,
            len,
            crc: crc32c::crc32c(rec.payload),
            label: rec.label,
            width: rec.width,
            height: rec.height,
            encoding: rec.encoding as u8,
        };
        self.out
            .write_all(rec.payload)
            .map_err(|e| ShardError::io(&self.path, e))?;
        self.pos += len as u64;
        self.entries.extend_from_slice(&entry.encode());
        self.paths.push(rec.path.to_string());
        if self.fsync && self.pos - self.flushed >= WRITEBACK_CHUNK {
            self.start_writeback()?;
        }
        Ok(())
    }

    /// Asks the kernel to begin writing the bytes so far to disk, without waiting (Linux).
    fn start_writeback(&mut self) -> Result<(), ShardError> {
        self.out
            .flush()
            .map_err(|e| ShardError::io(&self.path, e))?;
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let fd = self.out.get_ref().as_raw_fd();
            // SAFETY: a valid fd of our open file; the call only schedules I/O.
            unsafe {
                libc::sync_file_range(
                    fd,
                    self.flushed as libc::off64_t,
                    (self.pos - self.flushed) as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
        }
        self.flushed = self.pos;
        Ok(())
    }

    /// Writes index, path table and header; fsyncs. Returns the manifest entry.
    pub fn finish(mut self) -> Result<ShardInfo, ShardError> {
        let io = |e| ShardError::io(&self.path, e);
        let raw = encode_paths(&self.paths);
        let meta = zstd::bulk::compress(&raw, META_ZSTD_LEVEL).map_err(io)?;
        let n = self.paths.len() as u64;
        let header = Header {
            shard_id: self.shard_id,
            first_index: self.first_index,
            record_count: n,
            index_offset: self.pos,
            meta_offset: self.pos + n * ENTRY_LEN as u64,
            meta_len: u32::try_from(meta.len())
                .map_err(|_| ShardError::Invalid("path table exceeds 4 GiB".into()))?,
            meta_raw_len: u32::try_from(raw.len())
                .map_err(|_| ShardError::Invalid("path table exceeds 4 GiB".into()))?,
            index_crc: crc32c::crc32c(&self.entries),
            meta_crc: crc32c::crc32c(&meta),
        };
        self.out.write_all(&self.entries).map_err(io)?;
        self.out.write_all(&meta).map_err(io)?;
        self.out.seek(SeekFrom::Start(0)).map_err(io)?;
        self.out.write_all(&header.encode()).map_err(io)?;
        let file = self
            .out
            .into_inner()
            .map_err(|e| ShardError::io(&self.path, e.into_error()))?;
        if self.fsync {
            file.sync_all().map_err(|e| ShardError::io(&self.path, e))?;
        }
        Ok(ShardInfo {
            file: self
                .path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned(),
            first_index: self.first_index,
            records: n,
            payload_bytes: self.pos - HEADER_LEN as u64,
            file_bytes: header.meta_offset + meta.len() as u64,
        })
    }
}

/// Writes a whole dataset directory (which must exist): shards of about `shard_bytes`, then the
/// manifest. Records are numbered in push order.
pub struct DatasetWriter {
    dir: PathBuf,
    shard_bytes: u64,
    current: Option<ShardWriter>,
    shards: Vec<ShardInfo>,
    next_index: u64,
    class_counts: Vec<u64>,
    unlabelled: u64,
    fsync: bool,
}

impl DatasetWriter {
    pub fn new(dir: &Path, shard_bytes: u64) -> DatasetWriter {
        DatasetWriter {
            dir: dir.to_path_buf(),
            shard_bytes: shard_bytes.max(1),
            current: None,
            shards: Vec::new(),
            next_index: 0,
            class_counts: Vec::new(),
            unlabelled: 0,
            fsync: true,
        }
    }

    /// Whether shards and manifest are fsynced when finished (default true).
    pub fn with_fsync(mut self, on: bool) -> DatasetWriter {
        self.fsync = on;
        self
    }

    /// Records pushed so far.
    pub fn len(&self) -> u64 {
        self.next_index
    }

    pub fn is_empty(&self) -> bool {
        self.next_index == 0
    }

    pub fn push(&mut self, rec: &NewRecord) -> Result<u64, ShardError> {
        if rec.label < UNLABELLED {
            return Err(ShardError::Invalid(format!(
                "{}: label {} is negative",
                rec.path, rec.label
            )));
        }
        let full = self.current.as_ref().is_some_and(|w| {
            !w.is_empty() && w.payload_bytes() + rec.payload.len() as u64 > self.shard_bytes
        });
        if full {
            let w = self.current.take().unwrap();
            self.shards.push(w.finish()?);
        }
        if self.current.is_none() {
            let id = self.shards.len() as u32;
            let path = self.dir.join(shard_file_name(id));
            self.current =
                Some(ShardWriter::create(&path, id, self.next_index)?.with_fsync(self.fsync));
        }
        self.current.as_mut().unwrap().push(rec)?;
        if rec.label == UNLABELLED {
            self.unlabelled += 1;
        } else {
            let l = rec.label as usize;
            if self.class_counts.len() <= l {
                self.class_counts.resize(l + 1, 0);
            }
            self.class_counts[l] += 1;
        }
        self.next_index += 1;
        Ok(self.next_index - 1)
    }

    /// Closes the last shard and writes `manifest.json` (last, so its presence means complete).
    pub fn finish(
        mut self,
        classes: Vec<String>,
        pack: PackOptions,
        skipped: Vec<SkippedFile>,
    ) -> Result<Manifest, ShardError> {
        if let Some(w) = self.current.take() {
            self.shards.push(w.finish()?);
        }
        if self.class_counts.len() > classes.len() {
            return Err(ShardError::Invalid(format!(
                "label {} used but only {} class names given",
                self.class_counts.len() - 1,
                classes.len()
            )));
        }
        let mut class_counts = self.class_counts;
        class_counts.resize(classes.len(), 0);
        let manifest = Manifest {
            format: "udi-shards".into(),
            version: VERSION,
            classes,
            class_counts,
            unlabelled: self.unlabelled,
            records: self.next_index,
            payload_bytes: self.shards.iter().map(|s| s.payload_bytes).sum(),
            shards: self.shards,
            pack,
            skipped,
        };
        let path = self.dir.join(MANIFEST_FILE);
        let mut json = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
        json.push(b'\n');
        let mut f = File::create(&path).map_err(|e| ShardError::io(&path, e))?;
        f.write_all(&json).map_err(|e| ShardError::io(&path, e))?;
        if self.fsync {
            f.sync_all().map_err(|e| ShardError::io(&path, e))?;
        }
        Ok(manifest)
    }
}
