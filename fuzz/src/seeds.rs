//! The seed corpora: a few well-formed inputs per target that reach the
//! deep paths (a negotiated device serving requests, frames of every kind,
//! tar streams with every entry type), for the fuzzer to mutate.

use hull_protocol::frame::Frame;
use hull_protocol::spec::RunSpec;

use crate::virtio::{op, Kind, Program};

/// `(target, seeds)` for every target.
#[must_use]
pub fn all() -> Vec<(&'static str, Vec<Vec<u8>>)> {
    vec![
        ("virtio_blk", blk()),
        ("virtio_net", net()),
        ("virtio_console", console()),
        ("virtio_rng", rng()),
        ("protocol", protocol()),
        ("unpack", unpack()),
    ]
}

const W: u16 = 2;

/// A virtio-blk request header: type, reserved, sector.
fn blk_header(kind: u32, sector: u64) -> Vec<u8> {
    let mut h = kind.to_le_bytes().to_vec();
    h.extend_from_slice(&[0; 4]);
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

fn blk() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    // read, write, flush, get id, then an indirect read.
    let mut p = Program::new(Kind::Blk);
    p.setup(0, 1)
        .chain(
            0,
            &[
                (0, 16, 0, &blk_header(0, 1)),
                (0x1000, 512, W, &[]),
                (0x100, 1, W, &[]),
            ],
        )
        .chain(
            0,
            &[
                (0x200, 16, 0, &blk_header(1, 2)),
                (0x1000, 1024, 0, &[7; 32]),
                (0x300, 1, W, &[]),
            ],
        )
        .chain(0, &[(0x400, 16, 0, &blk_header(4, 0)), (0x500, 1, W, &[])])
        .chain(
            0,
            &[
                (0x600, 16, 0, &blk_header(8, 0)),
                (0x700, 20, W, &[]),
                (0x800, 1, W, &[]),
            ],
        )
        .notify(0)
        .memory(0x900, &blk_header(0, 0))
        .indirect(
            0,
            0x2000,
            &[(0x900, 16, 0), (0x3000, 4096, W), (0xa00, 1, W)],
        )
        .notify(0)
        .op(op::ACK)
        .read(0x100)
        .read(0x108);
    seeds.push(p.bytes());
    // a concatenated read-only disk, a reset and a second set-up.
    let mut p = Program::new(Kind::Blk);
    p.enc.bytes[0] = 2 | 4;
    p.setup(0, 1)
        .chain(
            0,
            &[
                (0, 16, 0, &blk_header(0, 127)),
                (0x1000, 1024, W, &[]),
                (0x100, 1, W, &[]),
            ],
        )
        .notify(0)
        .op(op::RESET)
        .setup(1 << 28, 1)
        .chain(
            0,
            &[
                (0, 16, 0, &blk_header(1, 0)),
                (0x1000, 512, 0, &[]),
                (0x100, 1, W, &[]),
            ],
        )
        .notify(0);
    seeds.push(p.bytes());
    seeds
}

fn net() -> Vec<Vec<u8>> {
    let frame: Vec<u8> = (0..60u8).collect();
    let mut tx = vec![0u8; 12];
    tx.extend_from_slice(&frame);
    let mut seeds = Vec::new();
    for refuse in [0, 1 << 15] {
        // With and without mergeable receive buffers.
        let mut p = Program::new(Kind::Net);
        p.setup(refuse, 2)
            .chain(0, &[(0x4000, 1526, W, &[])])
            .chain(0, &[(0x5000, 64, W, &[]), (0x6000, 4096, W, &[])])
            .notify(0)
            .host_send(true, &frame)
            .host_send(true, &frame)
            .op(op::RUN)
            .chain(1, &[(0x100, 72, 0, &tx[..63])])
            .chain(1, &[(0x200, 12, 0, &[]), (0x300, 60, 0, &frame[..50])])
            .notify(1)
            .op(op::HOST_RECV)
            .op(op::ACK);
        seeds.push(p.bytes());
    }
    seeds
}

/// A `struct virtio_console_control`.
fn control(event: u16, value: u16) -> Vec<u8> {
    let mut c = 0u32.to_le_bytes().to_vec();
    c.extend_from_slice(&event.to_le_bytes());
    c.extend_from_slice(&value.to_le_bytes());
    c
}

fn console() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    // Multiport: the control handshake, then data both ways.
    let mut p = Program::new(Kind::Console);
    p.setup(0, 4)
        .chain(2, &[(0x8000, 64, W, &[])])
        .chain(2, &[(0x8100, 64, W, &[])])
        .chain(2, &[(0x8200, 64, W, &[])])
        .notify(2)
        .chain(3, &[(0x9000, 8, 0, &control(0, 1))])
        .notify(3)
        .chain(3, &[(0x9100, 8, 0, &control(3, 1))])
        .chain(3, &[(0x9200, 8, 0, &control(6, 1))])
        .notify(3)
        .chain(0, &[(0x1000, 4096, W, &[])])
        .notify(0)
        .host_send(false, b"hello from the host")
        .op(op::RUN)
        .chain(1, &[(0x3000, 16, 0, b"hello from guest")])
        .notify(1)
        .op(op::HOST_RECV)
        .op(op::HOST_SHUTDOWN)
        .u8_raw(2)
        .op(op::RUN);
    seeds.push(p.bytes());
    // A plain console (no multiport).
    let mut p = Program::new(Kind::Console);
    p.setup(1 << 1, 4)
        .chain(0, &[(0x1000, 64, W, &[])])
        .host_send(false, b"input")
        .op(op::RUN)
        .chain(1, &[(0x3000, 6, 0, b"output")])
        .notify(1)
        .op(op::HOST_RECV);
    seeds.push(p.bytes());
    seeds
}

fn rng() -> Vec<Vec<u8>> {
    let mut p = Program::new(Kind::Rng);
    p.setup(0, 1)
        .chain(0, &[(0, 64, W, &[])])
        .chain(0, &[(0x100, 16, W, &[]), (0x200, 4096, W, &[])])
        .notify(0)
        .indirect(0, 0x8000, &[(0x300, 32, W), (0x400, 32, W)])
        .notify(0);
    vec![p.bytes()]
}

fn protocol() -> Vec<Vec<u8>> {
    let spec = serde_json::to_vec(&RunSpec::default()).unwrap_or_default();
    let frames = [
        Frame::Ready,
        Frame::Note(12, "spec read".into()),
        Frame::Stdout(b"hello\n".to_vec()),
        Frame::Stderr(b"oops\n".to_vec()),
        Frame::Proc(1, Box::new(Frame::Stdout(b"exec'd".to_vec()))),
        Frame::Proc(1, Box::new(Frame::Exited(0))),
        Frame::Failed {
            code: 127,
            message: "sh: not found".into(),
        },
        Frame::Exited(3),
        Frame::Spec(spec),
        Frame::Exec(2, b"{}".to_vec()),
        Frame::Signal(15),
        Frame::Resize(24, 80),
        Frame::CopyOut(3, b"/etc".to_vec()),
        Frame::StdinEof,
    ];
    let mut all = vec![7u8];
    let mut seeds = Vec::new();
    for frame in &frames {
        let bytes = frame.encode().unwrap_or_default();
        let mut one = vec![0u8];
        one.extend_from_slice(&bytes);
        seeds.push(one);
        all.extend_from_slice(&bytes);
    }
    seeds.push(all);
    seeds
}

/// A tar header for `path` (written as is: `..` and absolute paths too).
fn header(path: &[u8], kind: tar::EntryType, size: u64, link: &[u8]) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(if kind == tar::EntryType::Directory {
        0o755
    } else {
        0o644
    });
    h.set_mtime(1_700_000_000);
    {
        let gnu = h.as_gnu_mut().unwrap_or_else(|| unreachable!());
        gnu.name[..path.len()].copy_from_slice(path);
        gnu.linkname[..link.len()].copy_from_slice(link);
    }
    h.set_cksum();
    h
}

/// A tar entry: path, type, contents, link target.
type Entry<'a> = (&'a [u8], tar::EntryType, &'a [u8], &'a [u8]);

fn tar_of(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for &(path, kind, data, link) in entries {
        let h = header(path, kind, data.len() as u64, link);
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

fn unpack() -> Vec<Vec<u8>> {
    use tar::EntryType as T;
    let lower = tar_of(&[
        (b"etc/", T::Directory, b"", b""),
        (
            b"etc/passwd",
            T::Regular,
            b"root:x:0:0::/root:/bin/sh\n",
            b"",
        ),
        (b"etc/link", T::Symlink, b"", b"/etc"),
        (b"etc/hard", T::Link, b"", b"etc/passwd"),
        (b"etc/fifo", T::Fifo, b"", b""),
        (b"opt/a/b/c", T::Regular, b"deep", b""),
    ]);
    let upper = tar_of(&[
        (b"etc/.wh.passwd", T::Regular, b"", b""),
        (b"opt/.wh..wh..opq", T::Regular, b"", b""),
        (b"etc/link/x", T::Regular, b"through the link", b""),
        (b"./abs", T::Symlink, b"", b"/"),
        (b"abs/tmp/y", T::Regular, b"y", b""),
        (b"up", T::Symlink, b"", b"../../.."),
        (b"up/z", T::Regular, b"z", b""),
    ]);
    let hostile = tar_of(&[
        (b"../escape", T::Regular, b"no", b""),
        (b"/abs/file", T::Regular, b"in the root", b""),
        (b"h", T::Link, b"", b"../../canary"),
    ]);
    let mut long = Vec::new();
    let name = vec![b'n'; 300];
    long.extend_from_slice(
        header(b"././@LongLink", T::GNULongName, name.len() as u64, b"").as_bytes(),
    );
    long.extend_from_slice(&name);
    long.resize(long.len().div_ceil(512) * 512, 0);
    long.extend_from_slice(&tar_of(&[(b"short", T::Regular, b"long name", b"")]));

    let mut two = vec![1u8];
    two.extend_from_slice(&u16::try_from(lower.len()).unwrap_or(0).to_le_bytes());
    two.extend_from_slice(&lower);
    two.extend_from_slice(&upper);
    let mut seeds = Vec::new();
    for how in [1u8, 3] {
        let mut s = two.clone();
        s[0] = how;
        seeds.push(s);
    }
    for t in [hostile, long] {
        let mut s = vec![0u8];
        s.extend_from_slice(&t);
        seeds.push(s);
    }
    seeds
}
