//! fleet's paging of `/units`, `/state` and `/machines`, and the query
//! string those requests carry.
//!
//! A list answers at most [`PAGE_SIZE`] items and, when more may follow, a
//! `nextPageToken` for the next page. The token is fleet's: the page size and
//! the page number (from 1), each a little-endian `u16`, in URL-safe base64
//! with `=` padding, so page 2 of 100 is `ZAACAA==`. fleet emits a token
//! whenever a page ends at or before the last item (100 items: page 1 has a
//! token, page 2 is empty without one), and clients follow tokens until none
//! comes; flotilla does the same. A token that does not decode, names
//! another page size or page 0, or comes twice is a 400.
//!
//! Query strings are parsed leniently, as fleet's were: unknown parameters
//! (fleetctl sends `alt=json` with every request) are ignored.

use super::error::ApiError;

/// Items per page: fleetd's default `token_limit`.
pub const PAGE_SIZE: u16 = 100;

/// The parameters of a query string, percent-decoded, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query(Vec<(String, String)>);

impl Query {
    /// Parses `raw` (the part after `?`, if any).
    pub fn parse(raw: Option<&str>) -> Query {
        let pairs = raw
            .unwrap_or("")
            .split('&')
            .filter(|part| !part.is_empty())
            .map(|part| {
                let (key, value) = part.split_once('=').unwrap_or((part, ""));
                (decode_component(key), decode_component(value))
            })
            .collect();
        Query(pairs)
    }

    /// Every value given for `key`.
    pub fn all(&self, key: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The first value of `key`, if given and not empty (fleet's filters).
    pub fn first(&self, key: &str) -> Option<&str> {
        self.all(key).into_iter().next().filter(|v| !v.is_empty())
    }

    /// The page the request asks for, from its `nextPageToken` (page 1 without one).
    pub fn page(&self) -> Result<u16, ApiError> {
        match self.all("nextPageToken").as_slice() {
            [] => Ok(1),
            [token] => decode_token(token).map_err(|why| {
                ApiError::bad_request(format!(
                    "bad nextPageToken {token:?}: {why}; pass back the token a previous \
                     page returned, or leave it out for the first page"
                ))
            }),
            _ => Err(ApiError::bad_request("too many values for page token")),
        }
    }
}

/// The items of page `page` of `items`, and the token of the next page if
/// this page ends at or before the last item.
pub fn page_of<T>(items: Vec<T>, page: u16) -> (Vec<T>, Option<String>) {
    page_from(items, page)
}

/// [`page_of`] of items in order, taking no more of them than the page
/// needs: the ones before it are passed over, none after it is looked at.
pub fn page_from<T>(items: impl IntoIterator<Item = T>, page: u16) -> (Vec<T>, Option<String>) {
    let size = usize::from(PAGE_SIZE);
    let start = (usize::from(page.max(1)) - 1) * size;
    let end = start + size;
    let mut shown = Vec::new();
    let mut seen = 0;
    for item in items.into_iter().take(end) {
        if seen >= start {
            shown.push(item);
        }
        seen += 1;
    }
    let more = seen == end && page < u16::MAX;
    (shown, more.then(|| encode_token(page + 1)))
}

/// The token of `page`.
pub fn encode_token(page: u16) -> String {
    let mut bytes = [0u8; 4];
    bytes[..2].copy_from_slice(&PAGE_SIZE.to_le_bytes());
    bytes[2..].copy_from_slice(&page.to_le_bytes());
    base64_url(&bytes)
}

/// The page a token names, or why it names none.
fn decode_token(token: &str) -> Result<u16, String> {
    let bytes = unbase64_url(token)?;
    let [l0, l1, p0, p1, ..] = bytes[..] else {
        return Err("unexpected EOF".to_string());
    };
    if u16::from_le_bytes([l0, l1]) != PAGE_SIZE {
        return Err(format!("token limit must be {PAGE_SIZE}"));
    }
    match u16::from_le_bytes([p0, p1]) {
        0 => Err("token page must be greater than zero".to_string()),
        page => Ok(page),
    }
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// URL-safe base64 with `=` padding (Go's `base64.URLEncoding`).
fn base64_url(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes [`base64_url`]'s form strictly: padded to a multiple of four,
/// only the URL-safe alphabet, `=` only at the end.
fn unbase64_url(text: &str) -> Result<Vec<u8>, String> {
    let illegal = |at: usize| format!("illegal base64 data at input byte {at}");
    if !text.len().is_multiple_of(4) {
        return Err(illegal(text.len() / 4 * 4));
    }
    let mut out = Vec::new();
    let quads = text.as_bytes().chunks(4);
    let last = quads.len().saturating_sub(1);
    for (q, quad) in quads.enumerate() {
        let padding = quad.iter().rev().take_while(|&&c| c == b'=').count();
        if padding > 2 || (padding > 0 && q != last) {
            return Err(illegal(q * 4 + 4 - padding));
        }
        let mut n = 0u32;
        for (i, &c) in quad[..4 - padding].iter().enumerate() {
            let value = ALPHABET
                .iter()
                .position(|&a| a == c)
                .ok_or_else(|| illegal(q * 4 + i))?;
            n |= (value as u32) << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..4 - padding]);
    }
    Ok(out)
}

/// Percent-decodes one query component (`+` is a space, as in forms).
fn decode_component(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |at: usize| {
            bytes
                .get(at)
                .and_then(|b| char::from(*b).to_digit(16))
                .map(|d| d as u8)
        };
        match bytes[i] {
            b'%' if hex(i + 1).is_some() && hex(i + 2).is_some() => {
                out.push(hex(i + 1).unwrap_or(0) << 4 | hex(i + 2).unwrap_or(0));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_fleets() {
        assert_eq!(encode_token(1), "ZAABAA==");
        assert_eq!(encode_token(2), "ZAACAA==");
        assert_eq!(encode_token(3), "ZAADAA==");
        for page in [1, 2, 77, 300, u16::MAX] {
            assert_eq!(decode_token(&encode_token(page)), Ok(page));
        }
        assert_eq!(base64_url(b"hello"), "aGVsbG8=");
        assert_eq!(unbase64_url("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_url(&[0xfb, 0xff]), "-_8=");
    }

    #[test]
    fn bad_tokens_are_400() {
        let bad = [
            "EwBMLg==", // fleet's own test: limit 19
            "garbage!", "ZAAAAA==", // page 0
            "", "ZAACAA",   // unpadded
            "ZAAC",     // 3 bytes
            "ZA=CAA==", // padding inside
            "ZAACAA=x",
        ];
        for token in bad {
            let query = Query::parse(Some(&format!("nextPageToken={token}")));
            let err = query.page().unwrap_err();
            assert_eq!(err.status.as_u16(), 400, "{token:?}: {err}");
        }
        let twice = Query::parse(Some(
            "nextPageToken=ZAACAA%3D%3D&nextPageToken=ZAACAA%3D%3D",
        ));
        assert_eq!(
            twice.page().unwrap_err().message,
            "too many values for page token"
        );
        // Bytes after the first four are ignored, as in fleet.
        let long = base64_url(&[100, 0, 2, 0, 9, 9]);
        assert_eq!(decode_token(&long), Ok(2));
    }

    #[test]
    fn queries_are_lenient_and_decoded() {
        let query = Query::parse(Some(
            "alt=json&unitName=web%401.service&machineID=&nextPageToken=ZAACAA%3D%3D&x",
        ));
        assert_eq!(query.first("unitName"), Some("web@1.service"));
        assert_eq!(query.first("machineID"), None, "empty means no filter");
        assert_eq!(query.page().unwrap(), 2);
        assert_eq!(Query::parse(None).page().unwrap(), 1);
        assert_eq!(Query::parse(Some("a=b+c%2")).first("a"), Some("b c%2"));
    }

    #[test]
    fn pages_end_with_a_token_only_while_items_may_follow() {
        let items = |n: usize| (0..n).collect::<Vec<_>>();
        let (page, next) = page_of(items(250), 1);
        assert_eq!((page.len(), next.as_deref()), (100, Some("ZAACAA==")));
        let (page, next) = page_of(items(250), 2);
        assert_eq!((page[0], next.as_deref()), (100, Some("ZAADAA==")));
        let (page, next) = page_of(items(250), 3);
        assert_eq!((page.len(), next), (50, None));
        // Exactly one page: a token, then an empty page without one.
        let (page, next) = page_of(items(100), 1);
        assert_eq!((page.len(), next.as_deref()), (100, Some("ZAACAA==")));
        let (page, next) = page_of(items(100), 2);
        assert_eq!((page.len(), next), (0, None));
        let (page, next) = page_of(items(3), 9);
        assert_eq!((page.len(), next), (0, None));
        // Only what the page needs is taken.
        let mut taken = 0;
        let counted = (0..usize::MAX).inspect(|_| taken += 1);
        let (page, next) = page_from(counted, 2);
        assert_eq!(
            (page[0], page.len(), next.as_deref()),
            (100, 100, Some("ZAADAA=="))
        );
        assert_eq!(taken, 200);
    }
}
