//! Paths: ids are percent-encoded as exactly one path segment.

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::Error;

/// Everything but RFC 3986 "unreserved" characters is encoded, so `/`, `?`, `#`, `%`,
/// spaces and non-ASCII characters can never change the path.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `prefix/<id>` with `id` encoded as one segment.
pub(crate) fn with_id(prefix: &str, id: &str) -> Result<String, Error> {
    if id.is_empty() {
        return Err(Error::invalid_argument("the id must not be empty"));
    }
    if id == "." || id == ".." {
        // URL parsers resolve these (even as %2E) as dot segments.
        return Err(Error::invalid_argument(format!(
            "the id {id:?} cannot be sent as a path segment"
        )));
    }
    Ok(format!("{prefix}/{}", utf8_percent_encode(id, SEGMENT)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_one_segment() {
        let p = |id| with_id("/conversations/messages", id).unwrap();
        assert_eq!(
            p("eYBEm3gq3zc5ayE2g"),
            "/conversations/messages/eYBEm3gq3zc5ayE2g"
        );
        assert_eq!(p("a/b"), "/conversations/messages/a%2Fb");
        assert_eq!(p("a b"), "/conversations/messages/a%20b");
        assert_eq!(p("a?b#c"), "/conversations/messages/a%3Fb%23c");
        assert_eq!(p("100%"), "/conversations/messages/100%25");
        assert_eq!(p("é"), "/conversations/messages/%C3%A9");
        assert_eq!(p("a.b-c_d~"), "/conversations/messages/a.b-c_d~");
        assert!(with_id("/x", "").is_err());
        assert!(with_id("/x", "..").is_err());
        assert!(with_id("/x", ".").is_err());
    }
}
