//! The fuzz targets' input reader: little-endian integers and byte runs taken from the front
//! of the input; past its end everything reads as zero (so every input decodes to something).

/// An input being read: borrowed (`Input<&[u8]>`) or owned (`Input<Vec<u8>>`, for a reader
/// handed to another thread).
#[derive(Clone, Debug)]
pub struct Input<D: AsRef<[u8]>> {
    d: D,
    at: usize,
}

impl<D: AsRef<[u8]>> Input<D> {
    pub fn new(d: D) -> Self {
        Input { d, at: 0 }
    }

    /// Everything was read.
    pub fn done(&self) -> bool {
        self.at >= self.d.as_ref().len()
    }

    pub fn u8(&mut self) -> u8 {
        let b = self.d.as_ref().get(self.at).copied().unwrap_or(0);
        self.at = self.at.saturating_add(1);
        b
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | u32::from(self.u16()) << 16
    }

    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }

    /// The next `n` bytes (fewer at the end of the input).
    pub fn take(&mut self, n: usize) -> &[u8] {
        let d = self.d.as_ref();
        let from = self.at.min(d.len());
        let to = from.saturating_add(n).min(d.len());
        self.at = self.at.saturating_add(n);
        &d[from..to]
    }

    /// What is left, as an owned reader.
    pub fn rest(&self) -> Input<Vec<u8>> {
        let d = self.d.as_ref();
        Input::new(d[self.at.min(d.len())..].to_vec())
    }

    /// Skips the rest of the input.
    pub fn finish(&mut self) {
        self.at = self.d.as_ref().len();
    }
}

#[cfg(test)]
mod tests {
    use super::Input;

    #[test]
    fn reads_little_endian_then_zeros() {
        let mut r = Input::new(&[1u8, 2, 3, 4, 5][..]);
        assert_eq!(r.u16(), 0x0201);
        assert_eq!(r.take(2), &[3, 4]);
        let mut rest = r.rest();
        assert_eq!(r.u32(), 5);
        assert!(r.done());
        assert_eq!(r.u64(), 0);
        assert_eq!(r.take(3), &[] as &[u8]);
        assert_eq!(rest.u8(), 5);
        assert!(rest.done());
    }
}
