//! Bounded in-memory logs of a session's output.

use std::collections::VecDeque;

/// The newest `cap` bytes written to a stream, addressed by absolute offset
/// (bytes written since the start), so that readers can follow it and know
/// when they fell behind.
#[derive(Debug)]
pub(crate) struct RingLog {
    buf: VecDeque<u8>,
    cap: usize,
    /// Absolute offset of `buf[0]`.
    start: u64,
}

impl RingLog {
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            buf: VecDeque::new(),
            cap,
            start: 0,
        }
    }

    /// Appends, dropping the oldest bytes beyond the capacity.
    pub(crate) fn push(&mut self, data: &[u8]) {
        let data = if data.len() > self.cap {
            // Only the tail can survive: skip the rest without copying it.
            let skip = data.len() - self.cap;
            self.start += (self.buf.len() + skip) as u64;
            self.buf.clear();
            &data[skip..]
        } else {
            data
        };
        self.buf.extend(data);
        let over = self.buf.len().saturating_sub(self.cap);
        if over > 0 {
            self.buf.drain(..over);
            self.start += over as u64;
        }
    }

    /// Offset just past the newest byte (= bytes written so far).
    pub(crate) fn end(&self) -> u64 {
        self.start + self.buf.len() as u64
    }

    /// Up to `max` bytes from `offset` on, and the offset after them. A
    /// reader behind the oldest kept byte resumes there (the bytes in
    /// between are lost).
    pub(crate) fn read_from(&self, offset: u64, max: usize) -> (Vec<u8>, u64) {
        let from = offset.max(self.start).min(self.end());
        let skip = (from - self.start) as usize;
        let data: Vec<u8> = self.buf.iter().skip(skip).take(max).copied().collect();
        let next = from + data.len() as u64;
        (data, next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_the_newest_bytes() {
        let mut r = RingLog::new(8);
        r.push(b"hello");
        r.push(b" world");
        assert_eq!(r.end(), 11);
        assert_eq!(r.read_from(0, 100), (b"lo world".to_vec(), 11));
        assert_eq!(r.read_from(5, 3), (b" wo".to_vec(), 8));
        assert_eq!(r.read_from(11, 100), (Vec::new(), 11));
        assert_eq!(r.read_from(99, 100), (Vec::new(), 11));
    }

    #[test]
    fn a_write_larger_than_the_ring_keeps_its_tail() {
        let mut r = RingLog::new(4);
        r.push(b"ab");
        r.push(b"0123456789");
        assert_eq!(r.end(), 12);
        assert_eq!(r.read_from(0, 100), (b"6789".to_vec(), 12));
    }

    #[test]
    fn stays_bounded_under_many_writes() {
        let mut r = RingLog::new(1 << 20);
        let chunk = vec![7u8; 100_000];
        for _ in 0..50 {
            r.push(&chunk);
        }
        assert_eq!(r.end(), 5_000_000);
        let (data, next) = r.read_from(0, usize::MAX);
        assert_eq!(data.len(), 1 << 20);
        assert_eq!(next, 5_000_000);
    }
}
