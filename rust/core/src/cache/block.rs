//! One cached block on disk: a header that names the block and carries a
//! CRC32C per page of the payload, then the payload at a page-aligned
//! offset. A read `pread`s the pages it needs straight into the caller's
//! buffer and checks their CRCs there; only partly wanted edge pages go
//! through a small scratch buffer. A torn, truncated, flipped or foreign
//! file never reads as valid.
//!
//! ```text
//! 0   magic "FLBLOCK1"          8   header_bytes u32   12  page_bytes u32
//! 16  payload_bytes u64         24  ident_bytes u32    28  header crc32c u32
//! 32  ident (namespace, key, version, block) · one crc32c u32 per page · zeros
//! header_bytes (a multiple of 4 KiB): the payload
//! ```

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;

const MAGIC: &[u8; 8] = b"FLBLOCK1";
const FIXED_BYTES: usize = 32;
const ALIGN: usize = 4096;
/// Pages are the unit of checking: a 4 KiB read from a cached block reads
/// and checks one 64 KiB page, not the whole block.
pub const PAGE_BYTES: usize = 64 << 10;

/// What reading a block found.
#[derive(Debug)]
pub enum Found {
    /// The range is in `dst`, every page checked.
    Hit,
    /// No such block file.
    Missing,
    /// The file is there but is not this block, intact: why.
    Corrupt(String),
}

/// The header for `payload` named `ident`.
fn header(ident: &[u8], payload: &[u8]) -> Vec<u8> {
    let pages = payload.len().div_ceil(PAGE_BYTES);
    let used = FIXED_BYTES + ident.len() + 4 * pages;
    let len = used.div_ceil(ALIGN) * ALIGN;
    let mut h = Vec::with_capacity(len);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&(len as u32).to_le_bytes());
    h.extend_from_slice(&(PAGE_BYTES as u32).to_le_bytes());
    h.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    h.extend_from_slice(&(ident.len() as u32).to_le_bytes());
    h.extend_from_slice(&[0; 4]);
    h.extend_from_slice(ident);
    for page in payload.chunks(PAGE_BYTES) {
        h.extend_from_slice(&crc32c::crc32c(page).to_le_bytes());
    }
    h.resize(len, 0);
    let crc = header_crc(&h);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

fn header_crc(h: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&h[..28]), &h[32..])
}

/// Writes the block (header, payload) to `file`; the bytes it took.
pub fn write(file: &mut File, ident: &[u8], payload: &[u8]) -> io::Result<u64> {
    let h = header(ident, payload);
    file.write_all(&h)?;
    file.write_all(payload)?;
    Ok((h.len() + payload.len()) as u64)
}

/// A parsed, checked header.
struct Header {
    len: u64,
    payload_bytes: u64,
    crcs: Vec<u32>,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn read_header(file: &File, ident: &[u8]) -> io::Result<Result<Header, String>> {
    let mut h = vec![0u8; ALIGN];
    let got = read_full(file, &mut h, 0)?;
    if got < FIXED_BYTES || &h[..8] != MAGIC {
        return Ok(Err("no block header".into()));
    }
    let len = u32_at(&h, 8) as usize;
    let page_bytes = u32_at(&h, 12) as usize;
    let payload_bytes = u64::from_le_bytes(h[16..24].try_into().expect("8 bytes"));
    let ident_bytes = u32_at(&h, 24) as usize;
    if len < FIXED_BYTES || len % ALIGN != 0 || len > 64 << 20 || page_bytes != PAGE_BYTES {
        return Ok(Err(format!(
            "bad header length {len} or page size {page_bytes}"
        )));
    }
    if len > h.len() {
        h.resize(len, 0);
        read_full(file, &mut h[ALIGN..], ALIGN as u64)?;
    }
    h.truncate(len);
    if got < len.min(ALIGN) || header_crc(&h) != u32_at(&h, 28) {
        return Ok(Err("header checksum mismatch".into()));
    }
    if ident_bytes != ident.len() || &h[FIXED_BYTES..FIXED_BYTES + ident_bytes] != ident {
        return Ok(Err("the file names another block".into()));
    }
    let pages = (payload_bytes as usize).div_ceil(PAGE_BYTES);
    let at = FIXED_BYTES + ident_bytes;
    if at + 4 * pages > len {
        return Ok(Err("header too short for its pages".into()));
    }
    let crcs = (0..pages).map(|p| u32_at(&h, at + 4 * p)).collect();
    Ok(Ok(Header {
        len: len as u64,
        payload_bytes,
        crcs,
    }))
}

/// `pread` until `buf` is full or the file ends; the bytes read.
fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Reads `dst.len()` bytes at `offset` of the block named `ident`, which
/// must hold `payload_bytes`, from the open `file`, checking every page the
/// range touches.
pub fn read(
    file: &File,
    ident: &[u8],
    payload_bytes: u64,
    offset: u64,
    dst: &mut [u8],
) -> io::Result<Found> {
    let h = match read_header(file, ident)? {
        Ok(h) => h,
        Err(why) => return Ok(Found::Corrupt(why)),
    };
    if h.payload_bytes != payload_bytes {
        return Ok(Found::Corrupt(format!(
            "holds {} bytes, the block has {payload_bytes}",
            h.payload_bytes
        )));
    }
    let end = offset + dst.len() as u64;
    if end > payload_bytes {
        return Ok(Found::Corrupt(format!(
            "range ends at {end}, past the block's {payload_bytes} bytes"
        )));
    }
    let page = PAGE_BYTES as u64;
    let mut at = offset;
    let mut scratch = Vec::new();
    while at < end {
        let p = at / page;
        let page_start = p * page;
        let page_end = (page_start + page).min(payload_bytes);
        let expected = h.crcs[p as usize];
        let out = &mut dst[(at - offset) as usize..];
        if at == page_start && page_end <= end {
            // Whole pages the caller wants: straight into its buffer, as
            // many in a row as it covers, then checked in place.
            let last = if end == payload_bytes {
                h.crcs.len() as u64
            } else {
                end / page
            };
            let run_end = (last * page).min(payload_bytes);
            let run = &mut out[..(run_end - at) as usize];
            if read_full(file, run, h.len + at)? != run.len() {
                return Ok(Found::Corrupt("file is truncated".into()));
            }
            for (i, chunk) in run.chunks(PAGE_BYTES).enumerate() {
                if crc32c::crc32c(chunk) != h.crcs[p as usize + i] {
                    return Ok(Found::Corrupt(format!(
                        "page {} checksum mismatch",
                        p as usize + i
                    )));
                }
            }
            at = run_end;
            continue;
        }
        scratch.resize((page_end - page_start) as usize, 0);
        if read_full(file, &mut scratch, h.len + page_start)? != scratch.len() {
            return Ok(Found::Corrupt("file is truncated".into()));
        }
        if crc32c::crc32c(&scratch) != expected {
            return Ok(Found::Corrupt(format!("page {p} checksum mismatch")));
        }
        let take = (page_end.min(end) - at) as usize;
        let from = (at - page_start) as usize;
        out[..take].copy_from_slice(&scratch[from..from + take]);
        at += take as u64;
    }
    Ok(Found::Hit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(len: usize) -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b");
        let payload: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let mut f = File::create(&path).unwrap();
        write(&mut f, b"ns\0key\0v1\x003", &payload).unwrap();
        (dir, path, payload)
    }

    fn get(path: &std::path::Path, total: usize, off: usize, len: usize) -> (Found, Vec<u8>) {
        let f = File::open(path).unwrap();
        let mut dst = vec![0u8; len];
        let found = read(&f, b"ns\0key\0v1\x003", total as u64, off as u64, &mut dst).unwrap();
        (found, dst)
    }

    #[test]
    fn every_range_reads_back_exactly() {
        let total = 3 * PAGE_BYTES + 123;
        let (_d, path, payload) = block(total);
        for (off, len) in [
            (0, total),
            (0, 1),
            (5, 4096),
            (PAGE_BYTES, PAGE_BYTES),
            (PAGE_BYTES - 3, PAGE_BYTES + 10),
            (total - 100, 100),
            (2 * PAGE_BYTES, total - 2 * PAGE_BYTES),
        ] {
            let (found, dst) = get(&path, total, off, len);
            assert!(matches!(found, Found::Hit), "{off}+{len}: {found:?}");
            assert_eq!(dst, payload[off..off + len], "{off}+{len}");
        }
    }

    #[test]
    fn a_flipped_byte_a_torn_file_or_another_name_is_never_a_hit() {
        let total = 2 * PAGE_BYTES;
        let (_d, path, _) = block(total);
        let bytes = std::fs::read(&path).unwrap();
        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        // The first page is intact; the second is not.
        assert!(matches!(get(&path, total, 0, 10).0, Found::Hit));
        assert!(matches!(
            get(&path, total, total - 10, 10).0,
            Found::Corrupt(_)
        ));
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert!(matches!(get(&path, total, 0, total).0, Found::Corrupt(_)));
        std::fs::write(&path, &bytes[..100]).unwrap();
        assert!(matches!(get(&path, total, 0, 1).0, Found::Corrupt(_)));
        std::fs::write(&path, &bytes).unwrap();
        let f = File::open(&path).unwrap();
        let mut dst = [0u8; 1];
        let other = read(&f, b"ns\0key\0v2\x003", total as u64, 0, &mut dst).unwrap();
        assert!(matches!(other, Found::Corrupt(_)));
    }
}
