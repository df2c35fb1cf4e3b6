//! The exact-unmerge fix-up list of one tensor, as the sidecar stores it: the elements whose
//! original bits the unmerge must put back, in element order.
//!
//! Format 2 (written since this module): a byte stream of records `varint(gap) ++ original bits`
//! (the tensor's element size, little-endian), where `gap` is the element's index minus the one
//! after the previous record's (so at 1 % of elements listed it mostly fits one byte), plus a
//! table with, for every block of [`FIX_BLOCK`] elements, the stream offset of its first record
//! and the index the gaps continue from there, so that any run of rows decodes on its own.
//! About 3.3 bytes per bf16 entry instead of format 1's 6 (u32 index + value as two tensors),
//! which the reader still accepts.

use std::ops::Range;

use crate::checkpoint::FloatType;

/// Elements per block of the seek table.
pub(super) const FIX_BLOCK: u64 = 1 << 16;

/// Encodes the sorted entries `(index, original bits)` of a tensor of `numel` elements into
/// `stream` (cleared first); returns the seek table as (offset, next index) pairs, one per block.
pub(super) fn encode(
    ft: FloatType,
    numel: u64,
    entries: impl Iterator<Item = (u64, u32)>,
    stream: &mut Vec<u8>,
) -> Vec<u64> {
    let size = ft.size();
    let n_blocks = numel.div_ceil(FIX_BLOCK) as usize;
    stream.clear();
    let mut table = Vec::with_capacity(2 * n_blocks);
    let mut next = 0u64;
    for (index, bits) in entries {
        debug_assert!(
            index >= next && index < numel,
            "entries sorted and inside the tensor"
        );
        while (table.len() / 2) as u64 <= index / FIX_BLOCK {
            table.extend_from_slice(&[stream.len() as u64, next]);
        }
        let mut gap = index - next;
        while gap >= 0x80 {
            stream.push(gap as u8 | 0x80);
            gap >>= 7;
        }
        stream.push(gap as u8);
        stream.extend_from_slice(&bits.to_le_bytes()[..size]);
        next = index + 1;
    }
    while table.len() / 2 < n_blocks {
        table.extend_from_slice(&[stream.len() as u64, next]);
    }
    table
}

/// A validated format-2 fix-up list, borrowed from the sidecar's mapping.
pub(super) struct FixList<'a> {
    ft: FloatType,
    stream: &'a [u8],
    /// (offset, next index) per block.
    table: Vec<(u64, u64)>,
}

impl<'a> FixList<'a> {
    /// Checks the stream against the table and the tensor's size; the error says what is wrong.
    pub(super) fn new(
        ft: FloatType,
        numel: u64,
        stream: &'a [u8],
        table: &[u8],
    ) -> Result<Self, String> {
        let n_blocks = numel.div_ceil(FIX_BLOCK) as usize;
        if table.len() != 16 * n_blocks {
            return Err(format!(
                "seek table of {} bytes, expected {} for {numel} elements",
                table.len(),
                16 * n_blocks
            ));
        }
        let table: Vec<(u64, u64)> = table
            .chunks_exact(16)
            .map(|c| {
                let word = |k: usize| u64::from_le_bytes(c[8 * k..8 * k + 8].try_into().unwrap());
                (word(0), word(1))
            })
            .collect();
        let list = FixList { ft, stream, table };
        // Decode everything once: every block must start where the table says, with the index
        // it says, and every record must lie inside the tensor and the stream.
        let mut block = 0usize;
        let mut records = list.records(0);
        loop {
            let (at, next) = (records.at as u64, records.next);
            let record = records.next_record()?;
            let first_of = record.map_or(numel, |(index, _)| index);
            while block < n_blocks && block as u64 * FIX_BLOCK <= first_of {
                if list.table[block] != (at, next) {
                    return Err(format!(
                        "seek table entry {block} does not match the records"
                    ));
                }
                block += 1;
            }
            match record {
                Some((index, _)) if index >= numel => {
                    return Err(format!("record for element {index} of {numel}"))
                }
                Some(_) => {}
                None => break,
            }
        }
        Ok(list)
    }

    /// Records from the start of the block holding element `from`.
    fn records(&self, from: u64) -> Records<'_> {
        let (at, next) = self
            .table
            .get((from / FIX_BLOCK) as usize)
            .copied()
            .unwrap_or((self.stream.len() as u64, u64::MAX));
        Records {
            stream: self.stream,
            size: self.ft.size(),
            at: at as usize,
            next,
        }
    }

    /// Every (index, bits) record, in order.
    #[cfg(test)]
    pub(super) fn entries(&self) -> Vec<(u64, u32)> {
        let mut records = self.records(0);
        std::iter::from_fn(|| records.next_record().expect("validated")).collect()
    }

    /// Puts back the listed elements among `range` into `buf` (which holds that range); returns
    /// how many it restored.
    pub(super) fn apply(&self, range: Range<u64>, buf: &mut [u8]) -> u64 {
        let mut records = self.records(range.start);
        let mut restored = 0;
        while let Ok(Some((index, bits))) = records.next_record() {
            if index >= range.end {
                break;
            }
            if index >= range.start {
                self.ft
                    .store_bits(buf, (index - range.start) as usize, bits);
                restored += 1;
            }
        }
        restored
    }
}

/// A cursor over the records.
struct Records<'a> {
    stream: &'a [u8],
    size: usize,
    at: usize,
    next: u64,
}

impl Records<'_> {
    /// The next (index, bits), `None` at the end of the stream.
    fn next_record(&mut self) -> Result<Option<(u64, u32)>, String> {
        if self.at >= self.stream.len() {
            return Ok(None);
        }
        let mut gap = 0u64;
        let mut shift = 0;
        loop {
            let Some(&b) = self.stream.get(self.at) else {
                return Err("record cut short".into());
            };
            self.at += 1;
            if shift > 63 || (shift == 63 && b > 1) {
                return Err("gap does not fit 64 bits".into());
            }
            gap |= u64::from(b & 0x7f) << shift;
            shift += 7;
            if b < 0x80 {
                break;
            }
        }
        let Some(raw) = self.stream.get(self.at..self.at + self.size) else {
            return Err("record cut short".into());
        };
        self.at += self.size;
        let mut word = [0u8; 4];
        word[..self.size].copy_from_slice(raw);
        let index = self
            .next
            .checked_add(gap)
            .ok_or_else(|| "index overflows".to_string())?;
        self.next = index + 1;
        Ok(Some((index, u32::from_le_bytes(word))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table_bytes(table: &[u64]) -> Vec<u8> {
        table.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn round_trips_and_restores_any_range() {
        let numel = 5 * FIX_BLOCK + 123;
        // Sparse, dense, a long gap across blocks, the very first and last elements.
        let mut entries: Vec<(u64, u32)> = vec![(0, 0x1234)];
        entries.extend((7..200).step_by(3).map(|i| (i, i as u32 & 0xffff)));
        entries.extend((2 * FIX_BLOCK - 2..2 * FIX_BLOCK + 2).map(|i| (i, 0xbeef)));
        entries.push((numel - 1, 0x7f80));
        for ft in [FloatType::BF16, FloatType::F32] {
            let mut stream = Vec::new();
            let table = encode(ft, numel, entries.iter().copied(), &mut stream);
            let list = FixList::new(ft, numel, &stream, &table_bytes(&table)).unwrap();
            for range in [
                0..numel,
                5..9,
                FIX_BLOCK - 3..2 * FIX_BLOCK + 1,
                numel - 1..numel,
                300..FIX_BLOCK,
            ] {
                let mut buf = vec![0u8; ft.size() * (range.end - range.start) as usize];
                let n = list.apply(range.clone(), &mut buf);
                let expected: Vec<_> = entries.iter().filter(|e| range.contains(&e.0)).collect();
                assert_eq!(n as usize, expected.len());
                for (i, bits) in expected {
                    assert_eq!(ft.load_bits(&buf, (i - range.start) as usize), *bits);
                }
            }
        }
        // Small: one byte of gap plus two of value per bf16 entry when the gaps are short.
        let mut stream = Vec::new();
        encode(
            FloatType::BF16,
            numel,
            (0..1000).map(|i| (i * 50, 1)),
            &mut stream,
        );
        assert_eq!(stream.len(), 3000);
    }

    #[test]
    fn corrupt_lists_are_refused() {
        let numel = 3 * FIX_BLOCK;
        let entries = [(5u64, 1u32), (FIX_BLOCK + 9, 2), (2 * FIX_BLOCK + 1, 3)];
        let mut stream = Vec::new();
        let table = encode(FloatType::BF16, numel, entries.into_iter(), &mut stream);
        let ok = |s: &[u8], t: &[u64], n: u64| {
            FixList::new(FloatType::BF16, n, s, &table_bytes(t)).map(|_| ())
        };
        assert!(ok(&stream, &table, numel).is_ok());
        assert!(ok(&stream[..stream.len() - 1], &table, numel)
            .unwrap_err()
            .contains("cut short"));
        assert!(ok(&stream, &table[..4], numel)
            .unwrap_err()
            .contains("seek table"));
        let mut t = table.clone();
        t[2] += 1;
        assert!(ok(&stream, &t, numel)
            .unwrap_err()
            .contains("does not match"));
        assert!(
            ok(&stream, &table[..4], 2 * FIX_BLOCK).is_err(),
            "a record past the tensor"
        );
        let mut s = stream.clone();
        s[0] = 0xff;
        assert!(ok(&s, &table, numel).is_err());
        assert!(ok(&[0xff; 12], &[0, 0, 12, 0, 12, 0], numel)
            .unwrap_err()
            .contains("64 bits"));
    }
}
