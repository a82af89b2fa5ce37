//! Walking descriptor chains the guest offers, defensively.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Address, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap};

/// One buffer of a descriptor chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Buf {
    pub addr: GuestAddress,
    pub len: u32,
    /// Device-writable (the driver reads it back).
    pub writable: bool,
}

/// A descriptor chain that breaks the ring's rules.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum ChainError {
    /// The head index is past the queue, or the first descriptor is unreadable.
    #[error("the chain is empty or its head is invalid")]
    Empty,
    /// The chain ends on a descriptor that announces a next one: a loop, a
    /// next index past the queue, an unreadable descriptor or indirect table,
    /// or more than 4 GiB in all.
    #[error("the chain is cut short (loop, bad next index or table)")]
    Broken,
    /// More descriptors than the device accepts per request.
    #[error("the chain has more than {0} descriptors")]
    TooLong(usize),
    /// A device-readable buffer after a device-writable one.
    #[error("A device-readable buffer follows a device-writable one")]
    Order,
}

/// Walks `chain` into at most `max` buffers, checking its structure (not the
/// buffer addresses: see [`in_memory`]).
pub(crate) fn walk<M>(chain: DescriptorChain<M>, max: usize) -> Result<Vec<Buf>, ChainError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let mut bufs: Vec<Buf> = Vec::new();
    let mut more = false;
    for desc in chain {
        if bufs.len() >= max {
            return Err(ChainError::TooLong(max));
        }
        let writable = desc.is_write_only();
        if !writable && bufs.last().is_some_and(|b| b.writable) {
            return Err(ChainError::Order);
        }
        more = desc.has_next();
        bufs.push(Buf {
            addr: desc.addr(),
            len: desc.len(),
            writable,
        });
    }
    if bufs.is_empty() {
        Err(ChainError::Empty)
    } else if more {
        Err(ChainError::Broken)
    } else {
        Ok(bufs)
    }
}

/// Whether every one of `bufs` lies inside guest RAM.
pub(crate) fn in_memory(mem: &GuestMemoryMmap, bufs: &[Buf]) -> bool {
    bufs.iter()
        .all(|b| b.len == 0 || GuestMemoryBackend::check_range(mem, b.addr, b.len as usize))
}

/// Total length of `bufs`.
pub(crate) fn total_len(bufs: &[Buf]) -> u64 {
    bufs.iter().map(|b| u64::from(b.len)).sum()
}

/// Calls `f(addr, len)` for each piece of guest memory holding bytes
/// `[start, start + len)` of `bufs` laid end to end; `len` past the end of
/// `bufs` is ignored. Stops at the first error.
pub(crate) fn for_each_piece<E>(
    bufs: &[Buf],
    mut start: u64,
    mut len: u64,
    mut f: impl FnMut(GuestAddress, usize) -> Result<(), E>,
) -> Result<(), E> {
    for b in bufs {
        if len == 0 {
            break;
        }
        let blen = u64::from(b.len);
        if start >= blen {
            start -= blen;
            continue;
        }
        let n = (blen - start).min(len);
        // `start + n <= blen <= u32::MAX`, so neither overflows.
        let Some(addr) = b.addr.checked_add(start) else {
            break;
        };
        f(addr, usize::try_from(n).unwrap_or(0))?;
        len -= n;
        start = 0;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf(addr: u64, len: u32) -> Buf {
        Buf {
            addr: GuestAddress(addr),
            len,
            writable: false,
        }
    }

    #[test]
    fn pieces_span_buffers() {
        let bufs = [buf(0x1000, 4), buf(0x2000, 0), buf(0x3000, 8)];
        let mut seen = Vec::new();
        for_each_piece::<()>(&bufs, 2, 6, |a, n| {
            seen.push((a.raw_value(), n));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, [(0x1002, 2), (0x3000, 4)]);
        seen.clear();
        for_each_piece::<()>(&bufs, 11, 100, |a, n| {
            seen.push((a.raw_value(), n));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, [(0x3007, 1)]);
        assert_eq!(total_len(&bufs), 12);
    }
}
