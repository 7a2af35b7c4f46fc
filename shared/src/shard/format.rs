//! Byte-level encoding of the shard header and index entries (see the FORMAT section).

use super::Encoding;

pub const MAGIC: [u8; 8] = *b"UDISHARD";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 128;
pub const ENTRY_LEN: usize = 32;
const HEADER_CRC_AT: usize = 124;

/// The fixed-size shard header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub shard_id: u32,
    pub first_index: u64,
    pub record_count: u64,
    pub index_offset: u64,
    pub meta_offset: u64,
    pub meta_len: u32,
    pub meta_raw_len: u32,
    pub index_crc: u32,
    pub meta_crc: u32,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.shard_id.to_le_bytes());
        b[16..24].copy_from_slice(&self.first_index.to_le_bytes());
        b[24..32].copy_from_slice(&self.record_count.to_le_bytes());
        b[32..40].copy_from_slice(&self.index_offset.to_le_bytes());
        b[40..48].copy_from_slice(&self.meta_offset.to_le_bytes());
        b[48..52].copy_from_slice(&self.meta_len.to_le_bytes());
        b[52..56].copy_from_slice(&self.meta_raw_len.to_le_bytes());
        b[56..60].copy_from_slice(&self.index_crc.to_le_bytes());
        b[60..64].copy_from_slice(&self.meta_crc.to_le_bytes());
        let crc = crc32c::crc32c(&b[..HEADER_CRC_AT]);
        b[HEADER_CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses and checks magic, version, reserved bytes and the header CRC.
    pub fn decode(b: &[u8]) -> Result<Header, String> {
        if b.len() < HEADER_LEN {
            return Err(format!(
                "file is {} bytes, shorter than the {HEADER_LEN}-byte header",
                b.len()
            ));
        }
        let b = &b[..HEADER_LEN];
        if b[0..8] != MAGIC {
            return Err("bad magic (not a shard file)".into());
        }
        let version = u32_at(b, 8);
        if version != VERSION {
            return Err(format!(
                "unsupported version {version} (this reader knows {VERSION})"
            ));
        }
        let stored = u32_at(b, HEADER_CRC_AT);
        let actual = crc32c::crc32c(&b[..HEADER_CRC_AT]);
        if stored != actual {
            return Err(format!(
                "header CRC32C mismatch ({stored:08x} stored, {actual:08x} computed)"
            ));
        }
        if b[64..HEADER_CRC_AT].iter().any(|&x| x != 0) {
            return Err("reserved header bytes are not zero".into());
        }
        Ok(Header {
            shard_id: u32_at(b, 12),
            first_index: u64_at(b, 16),
            record_count: u64_at(b, 24),
            index_offset: u64_at(b, 32),
            meta_offset: u64_at(b, 40),
            meta_len: u32_at(b, 48),
            meta_raw_len: u32_at(b, 52),
            index_crc: u32_at(b, 56),
            meta_crc: u32_at(b, 60),
        })
    }
}

/// One fixed-size index entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub offset: u64,
    pub len: u32,
    pub crc: u32,
    pub label: i32,
    pub width: u32,
    pub height: u32,
    pub encoding: u8,
}

impl Entry {
    pub fn encode(&self) -> [u8; ENTRY_LEN] {
        let mut b = [0u8; ENTRY_LEN];
        b[0..8].copy_from_slice(&self.offset.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..16].copy_from_slice(&self.crc.to_le_bytes());
        b[16..20].copy_from_slice(&self.label.to_le_bytes());
        b[20..24].copy_from_slice(&self.width.to_le_bytes());
        b[24..28].copy_from_slice(&self.height.to_le_bytes());
        b[28] = self.encoding;
        b
    }

    /// `b` must be exactly one entry (the caller slices it, bounds-checked).
    pub fn decode(b: &[u8]) -> Entry {
        Entry {
            offset: u64_at(b, 0),
            len: u32_at(b, 8),
            crc: u32_at(b, 12),
            label: u32_at(b, 16) as i32,
            width: u32_at(b, 20),
            height: u32_at(b, 24),
            encoding: b[28],
        }
    }

    pub fn encoding(&self) -> Option<Encoding> {
        Encoding::from_u8(self.encoding)
    }
}

pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Serialises the path table: `n` u32 end offsets, then the concatenated UTF-8 paths.
pub(crate) fn encode_paths(paths: &[String]) -> Vec<u8> {
    let total: usize = paths.iter().map(|p| p.len()).sum();
    let mut out = Vec::with_capacity(4 * paths.len() + total);
    let mut end = 0u32;
    for p in paths {
        end += p.len() as u32;
        out.extend_from_slice(&end.to_le_bytes());
    }
    for p in paths {
        out.extend_from_slice(p.as_bytes());
    }
    out
}

/// A decompressed, validated path table.
#[derive(Debug)]
pub(crate) struct PathTable {
    ends: Vec<u32>,
    strings: String,
}

impl PathTable {
    pub fn decode(raw: Vec<u8>, n: usize) -> Result<PathTable, String> {
        let head = n
            .checked_mul(4)
            .filter(|&h| h <= raw.len())
            .ok_or_else(|| {
                format!(
                    "path table of {} bytes is too short for {n} records",
                    raw.len()
                )
            })?;
        let ends: Vec<u32> = raw[..head].chunks_exact(4).map(|c| u32_at(c, 0)).collect();
        let strings = String::from_utf8(raw[head..].to_vec())
            .map_err(|_| "path table is not UTF-8".to_string())?;
        let mut prev = 0u32;
        for &e in &ends {
            if e < prev || e as usize > strings.len() || !strings.is_char_boundary(e as usize) {
                return Err("path table offsets are not increasing within bounds".into());
            }
            prev = e;
        }
        if prev as usize != strings.len() {
            return Err("path table has trailing bytes".into());
        }
        Ok(PathTable { ends, strings })
    }

    pub fn get(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.strings[start..self.ends[i] as usize]
    }
}
