//! The smallest `rbd import --export-format 2` stream: an empty (thin) image of a given size that
//! carries image metadata, so that one `rbd import` creates an image and its ownership keys in one
//! process where `rbd create` and one `rbd image-meta set` per key take three.
//!
//! The format is Ceph's documented export format 2 (`doc/dev/rbd-export.rst`, "RBD Export &
//! Import", and `doc/dev/rbd-diff.rst` for the diff part), read by `rbd import` since Luminous:
//!
//! ```text
//! "rbd image v2\n"
//! metadata records: u8 tag, le64 length, data      ('M': le32 key length, key, le32 value length, value)
//! 'E'                                              (end of the image's records)
//! "rbd image diffs v2\n", le64 number of diffs (1: the image head, no snapshots)
//! "rbd diff v2\n", 's' le64 8 le64 size, 'e'       (a diff that writes nothing)
//! ```
//!
//! Features, order and striping are not in the stream: `rbd import` takes them from its command
//! line, like `rbd create`. No data record is written, so the image stays thin.

/// Bytes of a stream that makes an empty image of `size` bytes with `metadata`.
pub fn empty_image<'a>(
    size: u64,
    metadata: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Vec<u8> {
    let mut out = b"rbd image v2\n".to_vec();
    for (key, value) in metadata {
        let mut data = Vec::with_capacity(8 + key.len() + value.len());
        for s in [key, value] {
            data.extend_from_slice(&(s.len() as u32).to_le_bytes());
            data.extend_from_slice(s.as_bytes());
        }
        record(&mut out, b'M', &data);
    }
    out.push(b'E');
    out.extend_from_slice(b"rbd image diffs v2\n");
    out.extend_from_slice(&1u64.to_le_bytes());
    out.extend_from_slice(b"rbd diff v2\n");
    record(&mut out, b's', &size.to_le_bytes());
    out.push(b'e');
    out
}

fn record(out: &mut Vec<u8>, tag: u8, data: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    out.extend_from_slice(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_follows_the_documented_format() {
        let s = empty_image(64 << 20, [("k", "vv")]);
        let mut want = b"rbd image v2\n".to_vec();
        // 'M', le64 length 4+1+4+2 = 11, le32 1 "k", le32 2 "vv".
        want.push(b'M');
        want.extend_from_slice(&11u64.to_le_bytes());
        want.extend_from_slice(&[1, 0, 0, 0, b'k', 2, 0, 0, 0, b'v', b'v']);
        want.push(b'E');
        want.extend_from_slice(b"rbd image diffs v2\n");
        want.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
        want.extend_from_slice(b"rbd diff v2\ns");
        want.extend_from_slice(&[8, 0, 0, 0, 0, 0, 0, 0]);
        want.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0]);
        want.push(b'e');
        assert_eq!(s, want);
    }

    #[test]
    fn no_metadata_is_still_a_whole_stream() {
        let s = empty_image(1, []);
        assert!(s.starts_with(b"rbd image v2\nE"));
        assert!(s.ends_with(b"e"));
    }
}
