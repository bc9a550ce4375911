//! A webhook delivery's body at rest in SQLite (`inbox_body`, migration 9): an LZ4 block when that is
//! smaller, the bytes as they came otherwise.
//!
//! Why: a 13.5 KB GitHub delivery took a leaf and four overflow pages, each written to the WAL at its
//! accept (fsynced: its 202 waits for it) and again into the database file at the checkpoint. JSON
//! full of repeated URLs packs to under a third (`a_github_delivery_packs_to_a_fraction_and_back`
//! below), one page. LZ4 because it is fast: about 10 µs for such a body, less than writing the
//! pages it saves (`cargo bench --bench webhooks`, BENCHMARKS.md §5, stop 28). The HTTP handler
//! packs it (`InboxItem::packed`), off the store's thread, beside the body's hash.
//!
//! Stored form (`packed = 1`): the body's length as 4 bytes little-endian, then one LZ4 block
//! (`lz4_flex`'s "size prepended" form). `packed = 0`: the body itself (rows from before migration 9,
//! and bodies LZ4 does not make smaller). PostgreSQL is not concerned: it compresses large values
//! itself (TOAST).

/// How `inbox_body.body` is stored.
pub const RAW: i64 = 0;
/// `inbox_body.body` is the length and an LZ4 block.
pub const LZ4: i64 = 1;

/// LZ4 cannot expand data more than 255-fold, so a stored length beyond this many times the block's
/// size is damage, not data (checked before anything is allocated for it).
const MAX_RATIO: usize = 255;

/// Why a stored body could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// `packed` holds a value this version does not know.
    #[error("unknown packing {0}")]
    Packing(i64),
    /// Shorter than the 4-byte length.
    #[error("packed body of {0} bytes has no length")]
    Short(usize),
    /// The length cannot come from a block this size.
    #[error("packed body claims {claimed} bytes from a {block}-byte block")]
    Claim {
        /// The stored length.
        claimed: usize,
        /// The block's size.
        block: usize,
    },
    /// The block does not decode, or not to the stored length.
    #[error("packed body does not unpack: {0}")]
    Lz4(String),
}

/// How a body is to be stored: as it came (the body itself is written, no copy of it is kept), or
/// these LZ4 bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packed {
    /// LZ4 does not make it smaller.
    Raw,
    /// The length and the LZ4 block.
    Lz4(Vec<u8>),
}

impl Packed {
    /// The bytes to store for `body` (the body `self` was made from).
    pub fn bytes<'a>(&'a self, body: &'a [u8]) -> &'a [u8] {
        match self {
            Packed::Raw => body,
            Packed::Lz4(b) => b,
        }
    }

    /// The row's `packed` value.
    pub fn code(&self) -> i64 {
        match self {
            Packed::Raw => RAW,
            Packed::Lz4(_) => LZ4,
        }
    }
}

/// How `body` is stored.
pub fn pack(body: &[u8]) -> Packed {
    let packed = lz4_flex::compress_prepend_size(body);
    if packed.len() < body.len() {
        Packed::Lz4(packed)
    } else {
        Packed::Raw
    }
}

/// The body a stored row holds.
pub fn unpack(stored: Vec<u8>, packing: i64) -> Result<Vec<u8>, BodyError> {
    match packing {
        RAW => Ok(stored),
        LZ4 => {
            let (len, block) = stored
                .split_first_chunk::<4>()
                .ok_or(BodyError::Short(stored.len()))?;
            let claimed = u32::from_le_bytes(*len) as usize;
            if claimed > block.len().saturating_mul(MAX_RATIO).saturating_add(16) {
                return Err(BodyError::Claim {
                    claimed,
                    block: block.len(),
                });
            }
            let body = lz4_flex::block::decompress(block, claimed)
                .map_err(|e| BodyError::Lz4(e.to_string()))?;
            if body.len() != claimed {
                return Err(BodyError::Lz4(format!(
                    "{} bytes, not the {claimed} stored",
                    body.len()
                )));
            }
            Ok(body)
        }
        other => Err(BodyError::Packing(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_github_delivery_packs_to_a_fraction_and_back() {
        let body = include_bytes!("../../fixtures/github/issues.opened.json");
        let packed = pack(body);
        let stored = packed.bytes(body);
        assert_eq!(packed.code(), LZ4);
        assert!(
            stored.len() * 3 < body.len(),
            "{} of {} bytes",
            stored.len(),
            body.len()
        );
        assert_eq!(
            unpack(stored.to_vec(), packed.code()).expect("unpack"),
            body
        );
    }

    #[test]
    fn a_body_lz4_cannot_shrink_is_kept_as_it_came() {
        // Bytes with no repeats (a counter through a multiplicative hash): nothing to pack.
        let body: Vec<u8> = (0u32..600)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        let packed = pack(&body);
        assert_eq!(packed.code(), RAW);
        assert_eq!(packed.bytes(&body), &body[..]);
        assert_eq!(
            unpack(packed.bytes(&body).to_vec(), RAW).expect("raw"),
            body
        );
        assert_eq!((pack(b"").bytes(b"").len(), pack(b"").code()), (0, RAW));
    }

    #[test]
    fn a_damaged_row_is_an_error_not_a_panic_or_a_huge_allocation() {
        let good = pack(&[b'a'; 5000]).bytes(&[]).to_vec();
        // A length no 5-byte block can produce: refused before allocating 4 GiB.
        let mut huge = good.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(unpack(huge, LZ4), Err(BodyError::Claim { .. })));
        // The length one byte off: the block decodes to another size.
        let mut off = good.clone();
        off[..4].copy_from_slice(&4999u32.to_le_bytes());
        assert!(matches!(unpack(off, LZ4), Err(BodyError::Lz4(_))));
        // Truncated block, no length at all, an unknown packing.
        assert!(unpack(good[..good.len() - 1].to_vec(), LZ4).is_err());
        assert!(matches!(unpack(vec![1, 2], LZ4), Err(BodyError::Short(2))));
        assert!(matches!(unpack(good, 7), Err(BodyError::Packing(7))));
        // Every truncation and every single-byte change of a real packed body: an error or some
        // body, never a panic.
        let github = include_bytes!("../../fixtures/github/issues.opened.json");
        let real = pack(github).bytes(github).to_vec();
        for cut in 0..real.len().min(400) {
            let _ = unpack(real[..cut].to_vec(), LZ4);
        }
        for at in (0..real.len()).step_by(7) {
            let mut bent = real.to_vec();
            bent[at] ^= 0x5a;
            let _ = unpack(bent, LZ4);
        }
    }
}
