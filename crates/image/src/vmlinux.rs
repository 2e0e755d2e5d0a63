//! The uncompressed ELF `vmlinux` inside an x86 bzImage, which Firecracker
//! needs (it does not boot bzImages on x86_64).
//!
//! A bzImage is real-mode setup code followed by the protected-mode part,
//! whose compressed payload the boot protocol (2.08+) locates: it starts
//! `payload_offset` bytes into the protected-mode part, which begins after
//! `setup_sects + 1` sectors of 512 bytes. The payload is the compressed
//! `vmlinux` (gzip, xz, zstd, LZ4 legacy frame or lzma, by kernel config)
//! followed by its uncompressed size as a little-endian u32.
//!
//! The input is untrusted: every offset is bounds-checked, the output size
//! is capped, and nothing panics on garbage.

use std::io::{Read, Write};
use std::path::Path;

/// Cap on the decompressed kernel (real ones are 20-100 MiB), so a crafted
/// payload cannot fill memory.
pub const MAX_VMLINUX_BYTES: u64 = 1 << 30;
/// Cap on the bzImage read into memory (real ones are 5-20 MiB).
pub const MAX_BZIMAGE_BYTES: u64 = 256 << 20;
/// File name of the extracted kernel in a kernel directory.
pub const VMLINUX_FILE: &str = "vmlinux";

/// Offsets in the boot sector / setup header (Documentation/arch/x86/boot.rst).
const SETUP_SECTS: usize = 0x1f1;
const HEADER_MAGIC: usize = 0x202;
const PROTOCOL_VERSION: usize = 0x206;
const PAYLOAD_OFFSET: usize = 0x248;
const PAYLOAD_LENGTH: usize = 0x24c;
/// Boot protocol 2.08 added the payload fields.
const MIN_PROTOCOL: u16 = 0x0208;

/// LZ4 legacy frame: magic, then blocks of (u32 LE compressed size, block),
/// each decompressing to at most 8 MiB.
const LZ4_LEGACY_MAGIC: u32 = 0x184C_2102;
const LZ4_LEGACY_BLOCK: usize = 8 << 20;
/// LZ4_compressBound(8 MiB): the largest a block can be.
const LZ4_MAX_COMPRESSED_BLOCK: usize = LZ4_LEGACY_BLOCK + LZ4_LEGACY_BLOCK / 255 + 16;

/// How the kernel payload is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Xz,
    Zstd,
    Lz4,
    Lzma,
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Compression::Gzip => "gzip",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
            Compression::Lz4 => "lz4",
            Compression::Lzma => "lzma",
        })
    }
}

/// Why no vmlinux could be extracted.
#[derive(Debug, thiserror::Error)]
pub enum VmlinuxError {
    #[error("not a bzImage: {0}")]
    NotBzImage(String),
    #[error(
        "bzImage boot protocol {major}.{minor:02} is older than 2.08 and does not locate its payload"
    )]
    OldProtocol { major: u8, minor: u8 },
    #[error("bzImage is truncated: {0}")]
    Truncated(String),
    #[error(
        "kernel payload is compressed with {0}, which banger cannot unpack (it handles gzip, xz, zstd, lz4 and lzma)"
    )]
    UnsupportedCompression(&'static str),
    #[error("kernel payload has an unknown format (first bytes {0:02x?})")]
    UnknownCompression(Vec<u8>),
    #[error("decompressing the {compression} kernel payload: {detail}")]
    Decompress {
        compression: Compression,
        detail: String,
    },
    #[error("decompressed kernel is larger than {} MiB", MAX_VMLINUX_BYTES >> 20)]
    TooLarge,
    #[error("decompressed {0} kernel payload is not an ELF file")]
    NotElf(Compression),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The compressed payload of a bzImage, bounds-checked.
pub fn payload(bzimage: &[u8]) -> Result<&[u8], VmlinuxError> {
    if bzimage.get(HEADER_MAGIC..HEADER_MAGIC + 4) != Some(b"HdrS") {
        return Err(VmlinuxError::NotBzImage(
            "no \"HdrS\" setup header magic at 0x202".into(),
        ));
    }
    let protocol = u16_at(bzimage, PROTOCOL_VERSION)
        .ok_or_else(|| VmlinuxError::Truncated("setup header".into()))?;
    if protocol < MIN_PROTOCOL {
        let [minor, major] = protocol.to_le_bytes();
        return Err(VmlinuxError::OldProtocol { major, minor });
    }
    let field = |at: usize, name: &str| {
        u32_at(bzimage, at).ok_or_else(|| VmlinuxError::Truncated(format!("no {name} field")))
    };
    let payload_offset = field(PAYLOAD_OFFSET, "payload_offset")?;
    let payload_length = field(PAYLOAD_LENGTH, "payload_length")?;
    // 0 means 4, for compatibility with ancient boot loaders.
    let setup_sects = match bzimage[SETUP_SECTS] {
        0 => 4,
        n => u64::from(n),
    };
    let start = (setup_sects + 1) * 512 + u64::from(payload_offset);
    let end = start + u64::from(payload_length);
    let len = bzimage.len() as u64;
    if payload_length == 0 || end > len {
        return Err(VmlinuxError::Truncated(format!(
            "payload at {start}..{end} but the file has {len} bytes"
        )));
    }
    let (start, end) = (
        usize::try_from(start).map_err(|_| VmlinuxError::Truncated("payload offset".into()))?,
        usize::try_from(end).map_err(|_| VmlinuxError::Truncated("payload length".into()))?,
    );
    Ok(&bzimage[start..end])
}

/// Recognises the payload's compression by its magic bytes.
pub fn detect(payload: &[u8]) -> Result<Compression, VmlinuxError> {
    let starts = |m: &[u8]| payload.starts_with(m);
    if starts(&[0x1f, 0x8b]) {
        Ok(Compression::Gzip)
    } else if starts(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
        Ok(Compression::Xz)
    } else if starts(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Ok(Compression::Zstd)
    } else if starts(&LZ4_LEGACY_MAGIC.to_le_bytes()) {
        Ok(Compression::Lz4)
    } else if starts(&[0x5d, 0x00, 0x00]) {
        Ok(Compression::Lzma)
    } else if starts(b"BZh") {
        Err(VmlinuxError::UnsupportedCompression("bzip2"))
    } else if starts(&[0x89, b'L', b'Z', b'O']) {
        Err(VmlinuxError::UnsupportedCompression("lzo"))
    } else {
        Err(VmlinuxError::UnknownCompression(
            payload.iter().take(8).copied().collect(),
        ))
    }
}

/// Reads all of `r` up to [`MAX_VMLINUX_BYTES`].
fn read_capped(r: impl Read, compression: Compression) -> Result<Vec<u8>, VmlinuxError> {
    let mut out = Vec::new();
    r.take(MAX_VMLINUX_BYTES + 1)
        .read_to_end(&mut out)
        .map_err(|e| VmlinuxError::Decompress {
            compression,
            detail: e.to_string(),
        })?;
    if out.len() as u64 > MAX_VMLINUX_BYTES {
        return Err(VmlinuxError::TooLarge);
    }
    Ok(out)
}

/// Decompresses an LZ4 legacy frame (`lz4 -l`, what the kernel's
/// `CONFIG_KERNEL_LZ4` produces). The trailing u32 of the bzImage payload
/// (the uncompressed size) ends it.
fn unlz4_legacy(data: &[u8]) -> Result<Vec<u8>, VmlinuxError> {
    let err = |detail: String| VmlinuxError::Decompress {
        compression: Compression::Lz4,
        detail,
    };
    let mut rest = data
        .strip_prefix(&LZ4_LEGACY_MAGIC.to_le_bytes())
        .ok_or_else(|| err("no legacy frame magic".into()))?;
    let mut out = Vec::new();
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK];
    let mut blocks = 0usize;
    while let Some(size) = u32_at(rest, 0) {
        rest = &rest[4..];
        if size == LZ4_LEGACY_MAGIC {
            // Concatenated frames.
            continue;
        }
        let size = size as usize;
        if rest.is_empty() && blocks > 0 {
            // The appended uncompressed size, not a block.
            break;
        }
        if size > LZ4_MAX_COMPRESSED_BLOCK {
            return Err(err(format!(
                "block {blocks} claims {size} compressed bytes, more than an 8 MiB block can take"
            )));
        }
        let compressed = rest.get(..size).ok_or_else(|| {
            err(format!(
                "block {blocks} needs {size} bytes, {} are left",
                rest.len()
            ))
        })?;
        let n = lz4_flex::block::decompress_into(compressed, &mut block)
            .map_err(|e| err(format!("block {blocks}: {e}")))?;
        if (out.len() + n) as u64 > MAX_VMLINUX_BYTES {
            return Err(VmlinuxError::TooLarge);
        }
        out.extend_from_slice(&block[..n]);
        rest = &rest[size..];
        blocks += 1;
    }
    if blocks == 0 {
        return Err(err("no blocks".into()));
    }
    Ok(out)
}

/// Decompresses a payload of the given kind.
pub fn decompress(payload: &[u8], compression: Compression) -> Result<Vec<u8>, VmlinuxError> {
    let err = |e: &dyn std::fmt::Display| VmlinuxError::Decompress {
        compression,
        detail: e.to_string(),
    };
    match compression {
        Compression::Gzip => read_capped(flate2::read::GzDecoder::new(payload), compression),
        // One stream only: the payload ends with the size, not more streams.
        Compression::Xz => read_capped(lzma_rust2::XzReader::new(payload, false), compression),
        Compression::Zstd => {
            let decoder = ruzstd::decoding::StreamingDecoder::new(payload).map_err(|e| err(&e))?;
            read_capped(decoder, compression)
        }
        Compression::Lz4 => unlz4_legacy(payload),
        Compression::Lzma => {
            let reader = lzma_rust2::LzmaReader::new_mem_limit(payload, u32::MAX, None)
                .map_err(|e| err(&e))?;
            read_capped(reader, compression)
        }
    }
}

/// The ELF `vmlinux` inside a bzImage, and how it was compressed.
pub fn extract_vmlinux(bzimage: &[u8]) -> Result<(Vec<u8>, Compression), VmlinuxError> {
    let payload = payload(bzimage)?;
    let compression = detect(payload)?;
    let vmlinux = decompress(payload, compression)?;
    if !vmlinux.starts_with(b"\x7fELF") {
        return Err(VmlinuxError::NotElf(compression));
    }
    Ok((vmlinux, compression))
}

/// Whether `path` is an ELF file (an uncompressed vmlinux, booted as it is).
pub fn is_elf(path: &Path) -> std::io::Result<bool> {
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path)?;
    match f.read_exact(&mut magic) {
        Ok(()) => Ok(&magic == b"\x7fELF"),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// Extracts `bzimage`'s vmlinux into `dest`, through a temporary file and a
/// rename so nobody sees a half-written kernel.
pub fn extract_vmlinux_file(bzimage: &Path, dest: &Path) -> Result<Compression, VmlinuxError> {
    let io = |context: String| move |source| VmlinuxError::Io { context, source };
    let mut image = Vec::new();
    std::fs::File::open(bzimage)
        .and_then(|f| f.take(MAX_BZIMAGE_BYTES + 1).read_to_end(&mut image))
        .map_err(io(format!("reading {}", bzimage.display())))?;
    if image.len() as u64 > MAX_BZIMAGE_BYTES {
        return Err(VmlinuxError::NotBzImage(format!(
            "{} is larger than {} MiB",
            bzimage.display(),
            MAX_BZIMAGE_BYTES >> 20
        )));
    }
    let (vmlinux, compression) = extract_vmlinux(&image)?;
    let dir = dest.parent().unwrap_or(Path::new("."));
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{:016x}", rand::random::<u64>()));
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(&vmlinux)?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, dest));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(format!("writing {}", dest.display()))(e));
    }
    Ok(compression)
}

/// A bzImage of kernel `release` that boots nothing: the boot protocol's
/// header (2.15, 4 setup sectors, the release string where the kernel keeps
/// it) and `vmlinux` as its gzip payload. For tests and fixtures of the
/// code that registers kernels.
pub fn fake_bzimage(release: &str, vmlinux: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    // Writing into a Vec cannot fail.
    let _ = gz.write_all(vmlinux);
    let mut payload = gz.finish().unwrap_or_default();
    payload.extend_from_slice(&(vmlinux.len() as u32).to_le_bytes());
    // 4 setup sectors: the protected-mode part (and the payload) at 0xa00.
    let mut img = vec![0u8; 0xa00];
    img[SETUP_SECTS] = 4;
    img[HEADER_MAGIC..HEADER_MAGIC + 4].copy_from_slice(b"HdrS");
    img[PROTOCOL_VERSION..PROTOCOL_VERSION + 2].copy_from_slice(&0x020fu16.to_le_bytes());
    // kernel_version: the release string's offset from 0x200.
    img[0x20e..0x210].copy_from_slice(&0x400u16.to_le_bytes());
    img[PAYLOAD_LENGTH..PAYLOAD_LENGTH + 4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    let v = format!("{release} (builder@host) #1 SMP\0");
    let v = &v.as_bytes()[..v.len().min(0x400)];
    img[0x600..0x600 + v.len()].copy_from_slice(v);
    img.extend_from_slice(&payload);
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake vmlinux: ELF magic and some compressible, varied bytes.
    fn fake_vmlinux(len: usize) -> Vec<u8> {
        let mut v = b"\x7fELF\x02\x01\x01\x00".to_vec();
        let mut x: u32 = 12345;
        while v.len() < len {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            // Runs of repeated bytes so every codec has something to do.
            let b = (x >> 24) as u8;
            v.extend(std::iter::repeat_n(b, (x as usize >> 8) % 7 + 1));
        }
        v.truncate(len);
        v
    }

    /// A bzImage with `setup_sects` setup sectors and `payload` (to which the
    /// uncompressed size is appended, like the kernel build does).
    fn bzimage(setup_sects: u8, payload: &[u8], uncompressed: usize) -> Vec<u8> {
        let sects = if setup_sects == 0 {
            4
        } else {
            setup_sects as usize
        };
        let setup_len = (sects + 1) * 512;
        let payload_offset = 0x3b4usize; // somewhere inside the protected-mode part
        let mut img = vec![0u8; setup_len + payload_offset];
        img[SETUP_SECTS] = setup_sects;
        img[HEADER_MAGIC..HEADER_MAGIC + 4].copy_from_slice(b"HdrS");
        img[PROTOCOL_VERSION..PROTOCOL_VERSION + 2].copy_from_slice(&0x020fu16.to_le_bytes());
        let total = payload.len() + 4;
        img[PAYLOAD_OFFSET..PAYLOAD_OFFSET + 4]
            .copy_from_slice(&(payload_offset as u32).to_le_bytes());
        img[PAYLOAD_LENGTH..PAYLOAD_LENGTH + 4].copy_from_slice(&(total as u32).to_le_bytes());
        img.extend_from_slice(payload);
        img.extend_from_slice(&(uncompressed as u32).to_le_bytes());
        img.extend_from_slice(&[0u8; 100]); // trailing data after the payload
        img
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(data).expect("gzip");
        e.finish().expect("gzip")
    }

    fn xz(data: &[u8]) -> Vec<u8> {
        // Like the kernel: CRC32 check and the x86 BCJ filter.
        let mut opts = lzma_rust2::XzOptions::with_preset(6);
        opts.set_check_sum_type(lzma_rust2::CheckType::Crc32);
        opts.prepend_pre_filter(lzma_rust2::FilterType::BcjX86, 0);
        let mut w = lzma_rust2::XzWriter::new(Vec::new(), opts).expect("xz");
        w.write_all(data).expect("xz");
        w.finish().expect("xz")
    }

    fn zstd(data: &[u8]) -> Vec<u8> {
        ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
    }

    fn lz4_legacy(data: &[u8]) -> Vec<u8> {
        let mut out = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for chunk in data.chunks(LZ4_LEGACY_BLOCK) {
            let block = lz4_flex::block::compress(chunk);
            out.extend_from_slice(&(block.len() as u32).to_le_bytes());
            out.extend_from_slice(&block);
        }
        out
    }

    #[test]
    fn every_compression_round_trips() {
        // Unoptimised test builds compress slowly: small kernels, except
        // for LZ4, which must span more than one 8 MiB block.
        let small = fake_vmlinux(300_000);
        let big = fake_vmlinux(9 << 20);
        type Compress = fn(&[u8]) -> Vec<u8>;
        let cases: [(Compression, Compress, &[u8]); 4] = [
            (Compression::Gzip, gzip, &small),
            (Compression::Xz, xz, &small),
            (Compression::Zstd, zstd, &small),
            (Compression::Lz4, lz4_legacy, &big),
        ];
        for (kind, compress, vmlinux) in cases {
            for setup_sects in [0, 27] {
                let img = bzimage(setup_sects, &compress(vmlinux), vmlinux.len());
                let (out, found) = extract_vmlinux(&img).unwrap_or_else(|e| panic!("{kind}: {e}"));
                assert_eq!(found, kind);
                assert!(out == vmlinux, "{kind}: output differs");
            }
        }
    }

    #[test]
    fn writes_the_file_atomically() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vmlinux = fake_vmlinux(100_000);
        let src = dir.path().join("vmlinuz");
        std::fs::write(&src, bzimage(30, &lz4_legacy(&vmlinux), vmlinux.len())).expect("write");
        let dest = dir.path().join("vmlinux");
        assert_eq!(
            extract_vmlinux_file(&src, &dest).expect("extract"),
            Compression::Lz4
        );
        assert_eq!(std::fs::read(&dest).expect("read"), vmlinux);
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 2);

        let e = extract_vmlinux_file(&dir.path().join("missing"), &dest).expect_err("missing");
        assert!(matches!(e, VmlinuxError::Io { .. }), "{e:?}");
    }

    #[test]
    fn garbage_and_truncation_are_errors_not_panics() {
        let vmlinux = fake_vmlinux(100_000);
        let good = bzimage(27, &gzip(&vmlinux), vmlinux.len());

        assert!(matches!(
            extract_vmlinux(b""),
            Err(VmlinuxError::NotBzImage(_))
        ));
        assert!(matches!(
            extract_vmlinux(&[0xffu8; 4096]),
            Err(VmlinuxError::NotBzImage(_))
        ));
        // Cut inside the setup header, inside the payload, right after it.
        for cut in [0x205, 0x250, good.len() / 2, good.len() - 104] {
            let e = extract_vmlinux(&good[..cut]).expect_err("truncated");
            assert!(
                matches!(e, VmlinuxError::Truncated(_) | VmlinuxError::NotBzImage(_)),
                "cut {cut}: {e:?}"
            );
        }
        // Huge payload fields.
        let mut img = good.clone();
        img[PAYLOAD_OFFSET..PAYLOAD_OFFSET + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        img[PAYLOAD_LENGTH..PAYLOAD_LENGTH + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            extract_vmlinux(&img),
            Err(VmlinuxError::Truncated(_))
        ));
        // An old boot protocol.
        let mut img = good.clone();
        img[PROTOCOL_VERSION..PROTOCOL_VERSION + 2].copy_from_slice(&0x0204u16.to_le_bytes());
        assert!(matches!(
            extract_vmlinux(&img),
            Err(VmlinuxError::OldProtocol { major: 2, minor: 4 })
        ));
        // Unknown and unsupported payloads.
        let img = bzimage(27, b"\x00\x01\x02\x03garbage", 10);
        assert!(matches!(
            extract_vmlinux(&img),
            Err(VmlinuxError::UnknownCompression(_))
        ));
        let img = bzimage(27, b"BZh91AY&SY", 10);
        assert!(matches!(
            extract_vmlinux(&img),
            Err(VmlinuxError::UnsupportedCompression("bzip2"))
        ));
        // Corrupt compressed data, for every codec.
        let mut bad_gz = gzip(&vmlinux);
        let mid = bad_gz.len() / 2;
        bad_gz.truncate(mid);
        let mut bad_xz = xz(&vmlinux);
        let mid = bad_xz.len() / 2;
        bad_xz[mid..].fill(0x55);
        let mut bad_zstd = zstd(&vmlinux);
        let mid = bad_zstd.len() / 2;
        bad_zstd.truncate(mid);
        let mut bad_lz4 = lz4_legacy(&vmlinux);
        bad_lz4[4..8].copy_from_slice(&(LZ4_MAX_COMPRESSED_BLOCK as u32 + 1).to_le_bytes());
        let mut short_lz4 = lz4_legacy(&vmlinux);
        let mid = short_lz4.len() / 2;
        short_lz4.truncate(mid);
        for (name, payload) in [
            ("gzip", bad_gz),
            ("xz", bad_xz),
            ("zstd", bad_zstd),
            ("lz4 size", bad_lz4),
            ("lz4 short", short_lz4),
        ] {
            let e = extract_vmlinux(&bzimage(27, &payload, vmlinux.len())).expect_err(name);
            assert!(
                matches!(e, VmlinuxError::Decompress { .. }),
                "{name}: {e:?}"
            );
        }
        // Valid compression of something that is not ELF.
        let img = bzimage(27, &gzip(b"MZ not a kernel"), 15);
        assert!(matches!(
            extract_vmlinux(&img),
            Err(VmlinuxError::NotElf(Compression::Gzip))
        ));
    }
}
