//! Redaction of credentials in connection strings, by parsing rather than pattern matching, so every
//! form an operator may write is covered: URLs with `user:password@`, URLs whose query carries a
//! `password=` (libpq accepts it), libpq key/value DSNs (`host=db password='s3 cret'`), and lists of
//! either (`amqp://u:p@a,amqp://u:p@b`, `postgres://u:p@h1,h2/db`). What is printed keeps the shape
//! (hosts, ports, database, options) and replaces each secret with `***`.

/// Query or key/value parameters whose value is a secret.
const SECRET_KEYS: &[&str] = &["password", "sslpassword", "pass", "secret", "token"];

const MASK: &str = "***";

/// `s` with every password it carries replaced by `***`; anything that does not parse as a
/// connection string is returned as it is (it carries no recognisable secret field).
pub fn redact(s: &str) -> String {
    if find_scheme(s, 0).is_some() {
        redact_url_list(s)
    } else if s.contains('=') {
        redact_key_values(s)
    } else {
        s.to_owned()
    }
}

fn is_secret_key(key: &str) -> bool {
    SECRET_KEYS.iter().any(|k| key.eq_ignore_ascii_case(k))
}

/// The start of the first `scheme://` at or after `from` that begins a URL: at the start of the
/// string or right after a separator (`,`, whitespace, a quote).
fn find_scheme(s: &str, from: usize) -> Option<usize> {
    let bytes = s.as_bytes();
    let mut i = from;
    while let Some(rel) = s[i..].find("://") {
        let sep = i + rel;
        let mut start = sep;
        while start > 0
            && (bytes[start - 1].is_ascii_alphanumeric()
                || matches!(bytes[start - 1], b'+' | b'.' | b'-'))
        {
            start -= 1;
        }
        let begins_token =
            start == 0 || matches!(bytes[start - 1], b',' | b' ' | b'\t' | b'\n' | b'\'' | b'"');
        // `start >= from`: a scheme reached by walking back past `from` is the URL we are in.
        if start >= from && start < sep && bytes[start].is_ascii_alphabetic() && begins_token {
            return Some(start);
        }
        i = sep + 3;
    }
    None
}

fn redact_url_list(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut cursor = 0;
    while let Some(start) = find_scheme(s, cursor) {
        out.push_str(&s[cursor..start]);
        let end = find_scheme(s, start + 3)
            .map(|next| {
                // The separator before the next URL stays with the text between URLs.
                let mut e = next;
                while e > start && matches!(s.as_bytes()[e - 1], b',' | b' ' | b'\t' | b'\n') {
                    e -= 1;
                }
                e
            })
            .unwrap_or(s.len());
        out.push_str(&redact_one_url(&s[start..end]));
        cursor = end;
    }
    out.push_str(&s[cursor..]);
    out
}

fn redact_one_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let after = scheme_end + 3;
    let rest = &url[after..];
    // The authority (which may list several hosts) ends at the path, query or fragment.
    let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_len];
    let mut out = String::with_capacity(url.len());
    out.push_str(&url[..after]);
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            match userinfo.find(':') {
                Some(colon) => {
                    out.push_str(&userinfo[..colon]);
                    out.push(':');
                    out.push_str(MASK);
                }
                None => out.push_str(userinfo),
            }
            out.push_str(&authority[at..]);
        }
        None => out.push_str(authority),
    }
    let tail = &rest[authority_len..];
    match tail.find('?') {
        Some(q) => {
            out.push_str(&tail[..=q]);
            let query_and_fragment = &tail[q + 1..];
            let (query, fragment) = match query_and_fragment.find('#') {
                Some(h) => query_and_fragment.split_at(h),
                None => (query_and_fragment, ""),
            };
            let pairs: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((key, _)) if is_secret_key(&percent_decode(key)) => {
                        format!("{key}={MASK}")
                    }
                    _ => pair.to_owned(),
                })
                .collect();
            out.push_str(&pairs.join("&"));
            out.push_str(fragment);
        }
        None => out.push_str(tail),
    }
    out
}

pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            if let Some(b) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One `key = value` of a libpq key/value DSN, with the byte ranges of its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyValue {
    pub key: String,
    pub value: String,
    /// Byte range of the value as written (quotes included).
    pub value_span: std::ops::Range<usize>,
    /// Byte range of the whole pair as written.
    pub span: std::ops::Range<usize>,
}

/// Splits a libpq key/value DSN (`host=a port=5432 password='it''s'`) into its pairs, following
/// libpq's rules: whitespace around `=` is allowed, values may be single-quoted with `\'` and `\\`
/// escapes. Returns `None` when the text is not such a DSN.
pub(crate) fn key_values(s: &str) -> Option<Vec<KeyValue>> {
    let bytes = s.as_bytes();
    let mut pairs = Vec::new();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < bytes.len() && bytes[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    loop {
        skip_ws(&mut i);
        if i >= bytes.len() {
            break;
        }
        let start = i;
        while i < bytes.len() && !bytes[i].is_ascii_whitespace() && bytes[i] != b'=' {
            i += 1;
        }
        let key = s[start..i].to_owned();
        if key.is_empty() {
            return None;
        }
        skip_ws(&mut i);
        if i >= bytes.len() || bytes[i] != b'=' {
            return None;
        }
        i += 1;
        skip_ws(&mut i);
        let value_start = i;
        let mut value = String::new();
        if i < bytes.len() && bytes[i] == b'\'' {
            i += 1;
            let mut closed = false;
            while i < bytes.len() {
                match bytes[i] {
                    b'\\' if i + 1 < bytes.len() => {
                        value.push(bytes[i + 1] as char);
                        i += 2;
                    }
                    b'\'' => {
                        i += 1;
                        closed = true;
                        break;
                    }
                    _ => {
                        let ch = s[i..].chars().next()?;
                        value.push(ch);
                        i += ch.len_utf8();
                    }
                }
            }
            if !closed {
                return None;
            }
        } else {
            while i < bytes.len() && !bytes[i].is_ascii_whitespace() {
                if bytes[i] == b'\\' && i + 1 < bytes.len() {
                    value.push(bytes[i + 1] as char);
                    i += 2;
                    continue;
                }
                let ch = s[i..].chars().next()?;
                value.push(ch);
                i += ch.len_utf8();
            }
        }
        pairs.push(KeyValue {
            key,
            value,
            value_span: value_start..i,
            span: start..i,
        });
    }
    Some(pairs)
}

fn redact_key_values(s: &str) -> String {
    let Some(pairs) = key_values(s) else {
        return s.to_owned();
    };
    let mut out = String::with_capacity(s.len());
    let mut cursor = 0;
    for pair in pairs.iter().filter(|p| is_secret_key(&p.key)) {
        out.push_str(&s[cursor..pair.value_span.start]);
        out.push_str(MASK);
        cursor = pair.value_span.end;
    }
    out.push_str(&s[cursor..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_passwords_and_keep_everything_else() {
        let cases = [
            (
                "amqp://guest:secret@host:5672/%2f",
                "amqp://guest:***@host:5672/%2f",
            ),
            (
                "amqps://u:p%40ss@h/vh?heartbeat=10",
                "amqps://u:***@h/vh?heartbeat=10",
            ),
            (
                "postgres://postgres@127.0.0.1/db",
                "postgres://postgres@127.0.0.1/db",
            ),
            ("postgres://u:p@h/db?x=@", "postgres://u:***@h/db?x=@"),
            (
                "postgres://u@h/db?sslmode=require&password=hunter2&application_name=a",
                "postgres://u@h/db?sslmode=require&password=***&application_name=a",
            ),
            (
                "postgresql://u:pw@h1:5432,h2:5433/db?target_session_attrs=read-write",
                "postgresql://u:***@h1:5432,h2:5433/db?target_session_attrs=read-write",
            ),
            (
                "amqp://a:one@n1:5672/%2f,amqp://a:two@n2:5672/%2f, amqps://a:three@n3/%2f",
                "amqp://a:***@n1:5672/%2f,amqp://a:***@n2:5672/%2f, amqps://a:***@n3/%2f",
            ),
            (
                "postgres://u:p@h?PassWord=x#frag",
                "postgres://u:***@h?PassWord=***#frag",
            ),
            ("postgres://u:p:with:colons@h/db", "postgres://u:***@h/db"),
            ("not a url", "not a url"),
        ];
        for (input, expected) in cases {
            assert_eq!(redact(input), expected, "{input}");
        }
    }

    #[test]
    fn key_value_dsns_lose_their_passwords() {
        let cases = [
            (
                "host=db user=app password=hunter2 dbname=x",
                "host=db user=app password=*** dbname=x",
            ),
            (
                "host=db password = 'it\\'s secret' port=5432",
                "host=db password = *** port=5432",
            ),
            ("password=a sslpassword=b", "password=*** sslpassword=***"),
            ("host=db user=app", "host=db user=app"),
        ];
        for (input, expected) in cases {
            assert_eq!(redact(input), expected, "{input}");
        }
    }

    #[test]
    fn key_value_parsing_follows_libpq_quoting() {
        let pairs = key_values("a=1  b = 'x y' c='q\\'t' d=\\ x").unwrap();
        let got: Vec<(&str, &str)> = pairs
            .iter()
            .map(|p| (p.key.as_str(), p.value.as_str()))
            .collect();
        assert_eq!(got, [("a", "1"), ("b", "x y"), ("c", "q't"), ("d", " x")]);
        assert!(key_values("a=").is_some());
        assert!(key_values("a='unclosed").is_none());
        assert!(key_values("novalue").is_none());
    }

    #[test]
    fn no_secret_survives_any_form() {
        let secret = "Zq9-very-secret";
        for s in [
            format!("amqp://u:{secret}@h/%2f"),
            format!("postgres://u@h/db?password={secret}"),
            format!("host=h password={secret}"),
            format!("host=h password='{secret}'"),
            format!("amqp://u:x@a,amqps://u:{secret}@b"),
            format!("postgres://u:{secret}@a,b/db"),
        ] {
            assert!(!redact(&s).contains(secret), "{s} → {}", redact(&s));
        }
    }
}
