//! Structure-aware changes of a GGUF file (format v2/v3, little-endian): the header is walked
//! once to find where each count, length, type tag, metadata value, tensor dimension, tensor
//! type and data offset lies, then one of them is overwritten with a boundary value, or one
//! metadata entry is removed, duplicated or given a long string. A file that does not walk
//! (already damaged) gets `None`, and the caller falls back to byte changes.

use crate::mutate::{Rng, INTERESTING, INTERESTING_F};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// An unsigned count or length of this many bytes.
    Uint(usize),
    /// A signed or unsigned metadata integer of this many bytes.
    Int(usize),
    F32,
    F64,
    /// A value-type or tensor-type tag (u32).
    Tag,
}

#[derive(Clone, Copy, Debug)]
struct Field {
    at: usize,
    kind: Kind,
}

/// Where the fields of one metadata entry or tensor info lie.
struct Entry {
    start: usize,
    end: usize,
    fields: Vec<Field>,
}

struct Walk {
    /// Fields of the file header (version, tensor count, metadata count).
    header: Vec<Field>,
    entries: Vec<Entry>,
    /// Byte offsets of the metadata count, for removals and duplicates that keep it right.
    kv_count_at: usize,
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
    fields: Vec<Field>,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let s = self.b.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(s)
    }

    fn uint(&mut self, width: usize, kind: Kind) -> Option<u64> {
        let at = self.pos;
        let s = self.take(width)?;
        let mut v = [0u8; 8];
        v[..width].copy_from_slice(s);
        self.fields.push(Field { at, kind });
        Some(u64::from_le_bytes(v))
    }

    fn string(&mut self) -> Option<()> {
        let n = self.uint(8, Kind::Uint(8))?;
        self.take(usize::try_from(n).ok()?)?;
        Some(())
    }

    /// One metadata value of type `ty`; arrays record only their first 64 elements' fields.
    fn value(&mut self, ty: u64, depth: usize) -> Option<()> {
        match ty {
            0 | 1 | 7 => self.uint(1, Kind::Int(1)).map(drop),
            2 | 3 => self.uint(2, Kind::Int(2)).map(drop),
            4 | 5 => self.uint(4, Kind::Int(4)).map(drop),
            6 => self.uint(4, Kind::F32).map(drop),
            10 | 11 => self.uint(8, Kind::Int(8)).map(drop),
            12 => self.uint(8, Kind::F64).map(drop),
            8 => self.string(),
            9 if depth < 2 => {
                let inner = self.uint(4, Kind::Tag)?;
                let n = self.uint(8, Kind::Uint(8))?;
                for i in 0..n {
                    let keep = self.fields.len();
                    self.value(inner, depth + 1)?;
                    if i >= 64 {
                        self.fields.truncate(keep);
                    }
                }
                Some(())
            }
            _ => None,
        }
    }
}

fn walk(b: &[u8]) -> Option<Walk> {
    if b.get(..4)? != b"GGUF" {
        return None;
    }
    let mut r = Reader {
        b,
        pos: 4,
        fields: Vec::new(),
    };
    r.uint(4, Kind::Uint(4))?;
    let n_tensors = r.uint(8, Kind::Uint(8))?;
    let kv_count_at = r.pos;
    let n_kv = r.uint(8, Kind::Uint(8))?;
    let header = std::mem::take(&mut r.fields);
    let mut entries = Vec::new();
    for _ in 0..n_kv {
        let start = r.pos;
        r.string()?;
        let ty = r.uint(4, Kind::Tag)?;
        r.value(ty, 0)?;
        let fields = std::mem::take(&mut r.fields);
        entries.push(Entry {
            start,
            end: r.pos,
            fields,
        });
    }
    for _ in 0..n_tensors {
        let start = r.pos;
        r.string()?;
        let dims = r.uint(4, Kind::Uint(4))?;
        for _ in 0..dims.min(8) {
            r.uint(8, Kind::Uint(8))?;
        }
        r.uint(4, Kind::Tag)?;
        r.uint(8, Kind::Uint(8))?;
        let fields = std::mem::take(&mut r.fields);
        entries.push(Entry {
            start,
            end: r.pos,
            fields,
        });
    }
    Some(Walk {
        header,
        entries,
        kv_count_at,
    })
}

fn overwrite(out: &mut [u8], f: Field, rng: &mut Rng) {
    let bytes: Vec<u8> = match f.kind {
        Kind::Uint(w) | Kind::Int(w) => {
            let v = match rng.one_in(4) {
                // Near the old value: off by one, doubled.
                true => {
                    let mut old = [0u8; 8];
                    old[..w].copy_from_slice(&out[f.at..f.at + w]);
                    let old = u64::from_le_bytes(old);
                    *rng.pick(&[
                        old.wrapping_add(1),
                        old.wrapping_sub(1),
                        old.wrapping_mul(2),
                    ])
                }
                false => *rng.pick(&INTERESTING),
            };
            v.to_le_bytes()[..w].to_vec()
        }
        Kind::F32 => (*rng.pick(&INTERESTING_F) as f32).to_le_bytes().to_vec(),
        Kind::F64 => rng.pick(&INTERESTING_F).to_le_bytes().to_vec(),
        Kind::Tag => (rng.below(48) as u32).to_le_bytes().to_vec(),
    };
    out[f.at..f.at + bytes.len()].copy_from_slice(&bytes);
}

/// One structure-aware change, or `None` if `input` is not a GGUF file whose header walks.
pub fn mutate(input: &[u8], rng: &mut Rng) -> Option<Vec<u8>> {
    let w = walk(input)?;
    let mut out = input.to_vec();
    match rng.below(10) {
        0 => {
            let f = *rng.pick(&w.header);
            overwrite(&mut out, f, rng);
        }
        1..=6 => {
            let e = w.entries.get(rng.below(w.entries.len()))?;
            if e.fields.is_empty() {
                return None;
            }
            let f = *rng.pick(&e.fields);
            overwrite(&mut out, f, rng);
        }
        7 | 8 => {
            // Remove or duplicate one metadata entry, keeping the count right.
            let n_kv = u64::from_le_bytes(out[w.kv_count_at..w.kv_count_at + 8].try_into().ok()?);
            let i = rng.below(n_kv.min(w.entries.len() as u64) as usize);
            let e = w.entries.get(i)?;
            let piece = input[e.start..e.end].to_vec();
            let n_kv = match rng.one_in(2) {
                true => {
                    out.drain(e.start..e.end);
                    n_kv.wrapping_sub(1)
                }
                false => {
                    out.splice(e.end..e.end, piece);
                    n_kv.wrapping_add(1)
                }
            };
            out[w.kv_count_at..w.kv_count_at + 8].copy_from_slice(&n_kv.to_le_bytes());
        }
        _ => {
            // A metadata key or string value made long (a name quoted in errors).
            let e = w.entries.get(rng.below(w.entries.len()))?;
            let f = e.fields.iter().find(|f| f.kind == Kind::Uint(8))?;
            let len = u64::from_le_bytes(out[f.at..f.at + 8].try_into().ok()?) as usize;
            let long = vec![b'\x1b'; *rng.pick(&[100usize, 70_000])];
            let body = f.at + 8;
            out.splice(body..body + len, long.iter().copied());
            out[f.at..f.at + 8].copy_from_slice(&(long.len() as u64).to_le_bytes());
        }
    }
    Some(out)
}
