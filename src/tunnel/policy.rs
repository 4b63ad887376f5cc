//! The provider's policy (`tunnel serve`): what a consumer's REQ_HEADERS may ask of the upstream,
//! decided before anything reaches it. Sans-IO and pure: `serve.rs` calls [`Policy::check`] on
//! every REQ_HEADERS and answers a [`Refusal`] itself (RES_HEADERS + text body + RES_END).
//!
//! - Header caps: at most [`MAX_REQUEST_HEADERS`] fields and [`MAX_REQUEST_HEADER_BYTES`] of
//!   names and values → 431.
//! - The head must be one the upstream reads as serve does → 400: the method and every header
//!   name an HTTP token, no control characters (but tab) in header values, and a valid,
//!   unambiguous `content-length` (serve then writes no more body than it says).
//! - Only origin-form targets (`/path?query`): absolute-form (`http://host/x`), authority-form
//!   (`host:22`), asterisk-form (`OPTIONS *`) and the `CONNECT` method → 400.
//! - The path is normalised: percent-encoded unreserved characters are decoded (RFC 3986
//!   §6.2.2.2, so `%2e` is a dot and `%7e` a tilde), other escapes get upper-case hex, and
//!   dot-segments are resolved (§5.2.4). A `..` that would climb above the root — and so leave
//!   the upstream's base path, or the `--advertise` prefix the path came in under — → 403.
//!   Paths whose meaning differs between servers are refused → 400: an encoded slash or
//!   backslash (`%2f`, `%5c`) or NUL (`%00`), a raw backslash, a malformed `%` escape, a
//!   dot-segment with `;` parameters (`..;x`, read as `..` by some servers), a fragment (`#`),
//!   and control characters or spaces anywhere in the target.
//! - `--allow "METHOD /prefix"` rules (method `*` for any): when any is given, a request must
//!   match one, by method and by path prefix (whole segments) of the normalised path after
//!   `--advertise` stripping, without its query → 403 naming the rules.

use std::fmt;
use std::time::Duration;

/// Most header fields one request may carry to the upstream.
pub const MAX_REQUEST_HEADERS: usize = 100;
/// Most bytes of header names and values one request may carry to the upstream.
pub const MAX_REQUEST_HEADER_BYTES: usize = 64 * 1024;
/// `--stream-idle` default: a stream with no frame from its consumer and no progress with its
/// upstream for this long is ended.
pub const DEFAULT_STREAM_IDLE: Duration = Duration::from_secs(300);
/// Longest piece of a refused target quoted back in an answer.
const QUOTE_MAX: usize = 120;

/// Why a request is not forwarded: the status and plain-text body serve answers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub text: String,
}

impl Refusal {
    fn new(status: u16, text: String) -> Refusal {
        Refusal { status, text }
    }

    fn bad(target: &str, why: &str) -> Refusal {
        Refusal::new(
            400,
            format!("Bad Request: {why} (target '{}')", quote(target)),
        )
    }
}

/// At most [`QUOTE_MAX`] characters of `s`, with control characters shown as `?`.
fn quote(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(QUOTE_MAX)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if s.chars().count() > QUOTE_MAX {
        out.push('…');
    }
    out
}

/// One `--allow "METHOD /prefix"` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// `None` for `*` (any method).
    method: Option<String>,
    /// A normalised path without a trailing slash (`/` alone for everything).
    prefix: String,
}

impl Rule {
    /// Parses `METHOD /prefix`: a method token (or `*`) and a path without query, dot-segments
    /// or encoded slashes.
    pub fn parse(spec: &str) -> Result<Rule, String> {
        let bad = |why: &str| {
            format!("invalid --allow '{spec}': {why}; expected \"METHOD /prefix\", e.g. \"GET /v1/models\" or \"* /v1\"")
        };
        let mut parts = spec.split_whitespace();
        let (Some(method), Some(prefix), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad("not two words"));
        };
        let method = match method {
            "*" => None,
            m if m.bytes().all(is_tchar) => Some(m.to_ascii_uppercase()),
            _ => return Err(bad("the method is not a token")),
        };
        if !prefix.starts_with('/') || prefix.contains(['?', '#']) {
            return Err(bad("the prefix must be a path starting with / (no query)"));
        }
        let canonical = canonical_path(prefix).map_err(|r| bad(&r.text))?;
        if canonical.split('/').any(|s| s == "." || s == "..") {
            return Err(bad("the prefix has dot-segments"));
        }
        let trimmed = canonical.trim_end_matches('/');
        let prefix = if trimmed.is_empty() { "/" } else { trimmed };
        Ok(Rule {
            method,
            prefix: prefix.to_string(),
        })
    }

    /// Whether `method` on `path` (normalised, without query) falls under this rule.
    fn matches(&self, method: &str, path: &str) -> bool {
        if self.method.as_deref().is_some_and(|m| m != method) {
            return false;
        }
        self.prefix == "/" || under_prefix(&self.prefix, path)
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}",
            self.method.as_deref().unwrap_or("*"),
            self.prefix
        )
    }
}

/// `path` is `prefix` or lies under it (whole segments: `/v1` covers `/v1/x`, not `/v10`).
fn under_prefix(prefix: &str, path: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// What serve checks on every request.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// `--advertise`, without a trailing slash ("" for none).
    advertise: String,
    /// `--allow` rules; none allows everything inside the base path.
    rules: Vec<Rule>,
}

impl Policy {
    pub fn new(advertise: &str, rules: Vec<Rule>) -> Policy {
        Policy {
            advertise: advertise.trim_end_matches('/').to_string(),
            rules,
        }
    }

    /// Replaces the `--allow` rules.
    pub fn allow(&mut self, rules: Vec<Rule>) {
        self.rules = rules;
    }

    /// Checks a request head; returns the path to put after the upstream's base path (normalised,
    /// `--advertise` stripped, query kept), or why it is refused.
    pub fn check(
        &self,
        method: &str,
        target: &str,
        headers: &[(String, String)],
    ) -> Result<String, Refusal> {
        check_headers(headers)?;
        check_fields(method, headers)?;
        if method.eq_ignore_ascii_case("CONNECT") {
            return Err(Refusal::new(
                400,
                format!(
                    "Bad Request: CONNECT is not served by this provider (target '{}'); only \
                     origin-form requests (/path?query) reach the upstream",
                    quote(target)
                ),
            ));
        }
        let (path, query) = split_origin_form(target)?;
        let canonical = canonical_path(path).map_err(|r| Refusal::bad(target, &r.text))?;
        let (rest, under_advertise) = match strip_advertise(&self.advertise, &canonical) {
            Some(rest) => (rest, true),
            None => (canonical.as_str(), false),
        };
        let Some(resolved) = remove_dot_segments(rest) else {
            let root = if under_advertise {
                format!("the --advertise prefix {}", self.advertise)
            } else {
                "the upstream's base path".to_string()
            };
            return Err(Refusal::new(
                403,
                format!(
                    "Forbidden: the path '{}' climbs above {root} with '..'",
                    quote(target)
                ),
            ));
        };
        if !self.rules.is_empty() && !self.rules.iter().any(|r| r.matches(method, &resolved)) {
            let rules: Vec<String> = self.rules.iter().map(Rule::to_string).collect();
            return Err(Refusal::new(
                403,
                format!(
                    "Forbidden: {} {resolved} is not allowed by this provider (serve --allow: {})",
                    quote(method),
                    rules.join(", ")
                ),
            ));
        }
        Ok(match query {
            Some(q) => format!("{resolved}?{q}"),
            None => resolved,
        })
    }
}

/// The header caps → 431.
fn check_headers(headers: &[(String, String)]) -> Result<(), Refusal> {
    if headers.len() > MAX_REQUEST_HEADERS {
        return Err(Refusal::new(
            431,
            format!(
                "Request Header Fields Too Large: {} header fields; this provider takes at most \
                 {MAX_REQUEST_HEADERS}",
                headers.len()
            ),
        ));
    }
    let bytes: usize = headers.iter().map(|(n, v)| n.len() + v.len()).sum();
    if bytes > MAX_REQUEST_HEADER_BYTES {
        return Err(Refusal::new(
            431,
            format!(
                "Request Header Fields Too Large: {bytes} bytes of header names and values; this \
                 provider takes at most {MAX_REQUEST_HEADER_BYTES}"
            ),
        ));
    }
    Ok(())
}

/// The method and header fields must be what the upstream reads as serve does: otherwise a
/// space in a method or a header name like `transfer-encoding ` (which serve does not see as
/// Transfer-Encoding, but an upstream might) could make the upstream see another request.
fn check_fields(method: &str, headers: &[(String, String)]) -> Result<(), Refusal> {
    if method.is_empty() || !method.bytes().all(is_tchar) {
        return Err(Refusal::new(
            400,
            format!(
                "Bad Request: the method '{}' is not an HTTP token",
                quote(method)
            ),
        ));
    }
    for (name, value) in headers {
        if name.is_empty() || !name.bytes().all(is_tchar) {
            return Err(Refusal::new(
                400,
                format!(
                    "Bad Request: the header name '{}' is not an HTTP token",
                    quote(name)
                ),
            ));
        }
        if value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
            return Err(Refusal::new(
                400,
                format!("Bad Request: the value of header '{name}' has control characters"),
            ));
        }
    }
    if let Err(e) = crate::http1::content_length(headers) {
        return Err(Refusal::new(400, format!("Bad Request: {e}")));
    }
    Ok(())
}

/// Splits an origin-form target into path and query; any other form, a fragment, or control
/// characters and spaces → 400.
fn split_origin_form(target: &str) -> Result<(&str, Option<&str>), Refusal> {
    if target == "*" {
        return Err(Refusal::bad(
            target,
            "asterisk-form (OPTIONS *) is not served; only origin-form requests (/path?query) \
             reach the upstream",
        ));
    }
    if !target.starts_with('/') {
        let form = if target.contains("://") {
            "absolute-form"
        } else {
            "not origin-form"
        };
        return Err(Refusal::bad(
            target,
            &format!(
                "{form} targets are not served; only origin-form requests (/path?query) reach \
                 the upstream"
            ),
        ));
    }
    if target.chars().any(|c| c.is_control() || c == ' ') {
        return Err(Refusal::bad(target, "control characters or spaces"));
    }
    if target.contains('#') {
        return Err(Refusal::bad(target, "a fragment (#) in a request target"));
    }
    Ok(match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    })
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// RFC 9110 `tchar`, what a method is made of.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The path (no query) with percent-encoded unreserved characters decoded and other escapes in
/// upper case, dot-segments left in place. Refuses what servers read differently: encoded
/// slash, backslash or NUL, a raw backslash, malformed escapes, dot-segments with parameters.
/// The refusal's text is the reason alone.
fn canonical_path(path: &str) -> Result<String, Refusal> {
    let reason = |why: &str| Refusal::new(400, why.to_string());
    if path.contains('\\') {
        return Err(reason("a backslash in the path"));
    }
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b != b'%' {
            out.push(b);
            i += 1;
            continue;
        }
        let (Some(hi), Some(lo)) = (
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(reason("a malformed percent-escape in the path"));
        };
        let decoded = hi << 4 | lo;
        match decoded {
            b'/' => return Err(reason("an encoded slash (%2F) in the path")),
            b'\\' => return Err(reason("an encoded backslash (%5C) in the path")),
            0 => return Err(reason("an encoded NUL (%00) in the path")),
            d if is_unreserved(d) => out.push(d),
            d => out.extend_from_slice(format!("%{d:02X}").as_bytes()),
        }
        i += 3;
    }
    // Only ASCII bytes were replaced by ASCII, so the bytes are still UTF-8.
    let out = String::from_utf8(out).map_err(|_| reason("the path is not UTF-8"))?;
    for segment in out.split('/') {
        if let Some((head, _)) = segment.split_once(';') {
            if head == "." || head == ".." {
                return Err(reason("a dot-segment with parameters (..;) in the path"));
            }
        }
    }
    Ok(out)
}

/// `path` without the `--advertise` prefix (whole segments; an exact match is `/`), if it has it.
fn strip_advertise<'p>(advertise: &str, path: &'p str) -> Option<&'p str> {
    if advertise.is_empty() {
        return None;
    }
    match path.strip_prefix(advertise)? {
        "" => Some("/"),
        rest if rest.starts_with('/') => Some(rest),
        _ => None,
    }
}

/// RFC 3986 §5.2.4 on an absolute path, except that a `..` with nothing left to remove (which
/// the RFC drops) makes it `None`: such a path would climb above its root.
pub fn remove_dot_segments(path: &str) -> Option<String> {
    let mut segments = path.split('/');
    // The empty segment before the leading slash.
    segments.next();
    let segments: Vec<&str> = segments.collect();
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (i, segment) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        match *segment {
            "." => {}
            ".." => {
                out.pop()?;
            }
            other => {
                out.push(other);
                continue;
            }
        }
        // A path that ends in a dot-segment names a directory: it keeps its trailing slash.
        if last {
            out.push("");
        }
    }
    Some(format!("/{}", out.join("/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(p: &Policy, method: &str, target: &str) -> Result<String, (u16, String)> {
        p.check(method, target, &[]).map_err(|r| (r.status, r.text))
    }

    fn status(p: &Policy, method: &str, target: &str) -> u16 {
        match check(p, method, target) {
            Ok(_) => 200,
            Err((s, _)) => s,
        }
    }

    #[test]
    fn rfc3986_dot_segments() {
        // RFC 3986 §5.2.4's own examples and §5.4's normal cases, on absolute paths.
        for (input, want) in [
            ("/a/b/c/./../../g", "/a/g"),
            ("/", "/"),
            ("/a/b/c/.", "/a/b/c/"),
            ("/a/b/c/./", "/a/b/c/"),
            ("/a/b/c/..", "/a/b/"),
            ("/a/b/c/../", "/a/b/"),
            ("/a/b/c/../g", "/a/b/g"),
            ("/a/./b", "/a/b"),
            ("/a//b", "/a//b"),
            ("/a//../b", "/a/b"),
            ("/a/..", "/"),
            ("/.", "/"),
            ("/a/g.", "/a/g."),
            ("/a/.g", "/a/.g"),
            ("/a/g..", "/a/g.."),
            ("/a/..g", "/a/..g"),
            ("/a/b/c/g;x=1/../y", "/a/b/c/y"),
        ] {
            assert_eq!(remove_dot_segments(input).as_deref(), Some(want), "{input}");
        }
        // Where the RFC would drop a `..` at the root, the path leaves its root: refused.
        for input in ["/..", "/../g", "/a/../..", "/a/b/../../../c", "/./../x"] {
            assert_eq!(remove_dot_segments(input), None, "{input}");
        }
    }

    #[test]
    fn encoded_dots_are_dots() {
        let p = Policy::default();
        for target in [
            "/%2e%2e/secret",
            "/%2E%2E/secret",
            "/.%2e/secret",
            "/%2e./secret",
            "/a/%2e%2e/%2E%2e/secret",
            "/a/.%2E/../secret",
        ] {
            let (status, text) = check(&p, "GET", target).unwrap_err();
            assert_eq!(status, 403, "{target}");
            assert!(
                text.contains("climbs above the upstream's base path"),
                "{text}"
            );
        }
        assert_eq!(check(&p, "GET", "/a/%2e/b/%2E%2E/c").unwrap(), "/a/c");
        assert_eq!(
            check(&p, "GET", "/v1/%2e%2e/v2?x=%2e%2e").unwrap(),
            "/v2?x=%2e%2e"
        );
        // Unreserved escapes are decoded, others only get upper-case hex.
        assert_eq!(
            check(&p, "GET", "/%7euser/%61%3a%3F").unwrap(),
            "/~user/a%3A%3F"
        );
    }

    #[test]
    fn non_origin_forms_and_ambiguous_paths_are_400() {
        let p = Policy::default();
        for (method, target) in [
            ("GET", "http://internal.example/admin"),
            ("GET", "HTTP://internal.example/admin"),
            ("CONNECT", "host:22"),
            ("GET", "host:22"),
            ("CONNECT", "/x"),
            ("OPTIONS", "*"),
            ("GET", "x/../../y"),
            ("GET", ""),
            ("GET", "/a%2fb"),
            ("GET", "/a%2F..%2F..%2Fsecret"),
            ("GET", "/a%5c..%5csecret"),
            ("GET", "/a\\..\\secret"),
            ("GET", "/a%00b"),
            ("GET", "/a%zz"),
            ("GET", "/a%2"),
            ("GET", "/..;/secret"),
            ("GET", "/a/.;x/b"),
            ("GET", "/a#frag"),
            ("GET", "/a b"),
            ("GET", "/a\r\nX-Injected: 1"),
        ] {
            assert_eq!(status(&p, method, target), 400, "{method} {target}");
        }
        // Escapes and odd characters in the query are the upstream's business.
        assert_eq!(
            check(&p, "GET", "/q?a=%2f&b=..%5c").unwrap(),
            "/q?a=%2f&b=..%5c"
        );
        assert_eq!(check(&p, "OPTIONS", "/x").unwrap(), "/x");
        assert_eq!(check(&p, "GET", "/a;b=1/c").unwrap(), "/a;b=1/c");
        let (_, text) = check(&p, "GET", "http://internal.example/admin").unwrap_err();
        assert!(
            text.contains("absolute-form") && text.contains("internal.example"),
            "{text}"
        );
        let (_, text) = check(&p, "CONNECT", "host:22").unwrap_err();
        assert!(text.contains("CONNECT"), "{text}");
    }

    #[test]
    fn advertise_prefix_is_a_root_too() {
        let p = Policy::new("/api/", Vec::new());
        assert_eq!(
            check(&p, "GET", "/api/v1/models?x=1").unwrap(),
            "/v1/models?x=1"
        );
        assert_eq!(check(&p, "GET", "/api").unwrap(), "/");
        assert_eq!(check(&p, "GET", "/api?x").unwrap(), "/?x");
        assert_eq!(
            check(&p, "GET", "/%61pi/v1").unwrap(),
            "/v1",
            "spelt with an escape"
        );
        assert_eq!(check(&p, "GET", "/apix/y").unwrap(), "/apix/y");
        assert_eq!(check(&p, "GET", "/other").unwrap(), "/other");
        assert_eq!(check(&p, "GET", "/api/v1/../models").unwrap(), "/models");
        let (status, text) = check(&p, "GET", "/api/../secret").unwrap_err();
        assert_eq!(status, 403);
        assert!(text.contains("--advertise prefix /api"), "{text}");
        assert_eq!(status_of(&p, "/api/%2e%2e/secret"), 403);
        assert_eq!(status_of(&p, "/../api/x"), 403);
    }

    fn status_of(p: &Policy, target: &str) -> u16 {
        status(p, "GET", target)
    }

    #[test]
    fn allow_rules() {
        let rules = vec![
            Rule::parse("GET /v1/models").unwrap(),
            Rule::parse("post  /v1/chat/completions/").unwrap(),
            Rule::parse("* /public").unwrap(),
        ];
        assert_eq!(rules[1].to_string(), "POST /v1/chat/completions");
        let p = Policy::new("/", rules);
        for (method, target, want) in [
            ("GET", "/v1/models", 200),
            ("GET", "/v1/models/llama?x=1", 200),
            ("GET", "/v1/models?x=1", 200),
            ("GET", "/v1/modelsx", 403),
            ("POST", "/v1/models", 403),
            ("HEAD", "/v1/models", 403),
            ("get", "/v1/models", 403),
            ("POST", "/v1/chat/completions", 200),
            ("POST", "/v1/chat", 403),
            ("DELETE", "/public/x", 200),
            ("GET", "/public/../admin", 403),
            ("GET", "/v1/models/../../admin", 403),
            ("GET", "/v1/%6dodels", 200),
            ("GET", "/", 403),
        ] {
            assert_eq!(status(&p, method, target), want, "{method} {target}");
        }
        let (_, text) = check(&p, "GET", "/admin").unwrap_err();
        assert!(
            text.contains("GET /admin is not allowed")
                && text.contains(
                    "serve --allow: GET /v1/models, POST /v1/chat/completions, * /public"
                ),
            "{text}"
        );
        // `* /` allows everything; rules apply after --advertise stripping.
        let all = Policy::new("/", vec![Rule::parse("* /").unwrap()]);
        assert_eq!(status(&all, "PATCH", "/anything"), 200);
        let api = Policy::new("/api", vec![Rule::parse("GET /v1").unwrap()]);
        assert_eq!(status(&api, "GET", "/api/v1/models"), 200);
        assert_eq!(status(&api, "GET", "/v1/models"), 200);
        assert_eq!(status(&api, "GET", "/api/admin"), 403);
    }

    #[test]
    fn bad_allow_rules() {
        for spec in [
            "",
            "GET",
            "GET /a /b",
            "GET v1",
            "G(T /v1",
            "GET /v1?x=1",
            "GET /v1/../admin",
            "GET /a%2fb",
        ] {
            let err = Rule::parse(spec).unwrap_err();
            assert!(err.contains("--allow"), "{spec}: {err}");
        }
        assert_eq!(Rule::parse("GET /%7ea").unwrap().to_string(), "GET /~a");
    }

    #[test]
    fn methods_and_fields_must_be_tokens() {
        let p = Policy::default();
        let h = |n: &str, v: &str| vec![(n.to_string(), v.to_string())];
        for (method, headers) in [
            ("GET /admin HTTP/1.1\r\nX:", vec![]),
            ("GET /admin", vec![]),
            ("", vec![]),
            ("GET", h("transfer-encoding ", "chunked")),
            ("GET", h("x y", "1")),
            ("GET", h("", "1")),
            ("GET", h("x:y", "1")),
            ("GET", h("x", "a\r\nHost: evil")),
            ("GET", h("x", "a\0b")),
            ("POST", h("content-length", "5, 6")),
            ("POST", h("content-length", "-1")),
            ("POST", h("content-length", "0x10")),
        ] {
            let r = p.check(method, "/", &headers).unwrap_err();
            assert_eq!(r.status, 400, "{method:?} {headers:?}: {}", r.text);
        }
        assert!(p.check("M-SEARCH", "/", &h("x", "tab\tok")).is_ok());
        assert!(p.check("POST", "/", &h("content-length", "5, 5")).is_ok());
    }

    #[test]
    fn header_caps() {
        let p = Policy::default();
        let many: Vec<(String, String)> = (0..=MAX_REQUEST_HEADERS)
            .map(|i| (format!("x-{i}"), "v".to_string()))
            .collect();
        let r = p.check("GET", "/", &many).unwrap_err();
        assert_eq!(r.status, 431);
        assert!(r.text.contains("at most 100"), "{}", r.text);
        assert!(p.check("GET", "/", &many[..MAX_REQUEST_HEADERS]).is_ok());
        let big = vec![("x-big".to_string(), "v".repeat(MAX_REQUEST_HEADER_BYTES))];
        let r = p.check("GET", "/", &big).unwrap_err();
        assert_eq!(r.status, 431);
        assert!(r.text.contains("at most 65536"), "{}", r.text);
        let fits = vec![("x".to_string(), "v".repeat(MAX_REQUEST_HEADER_BYTES - 1))];
        assert!(p.check("GET", "/", &fits).is_ok());
    }

    #[test]
    fn quotes_are_short_and_printable() {
        let long = format!("/{}", "a".repeat(500));
        assert!(quote(&long).chars().count() <= QUOTE_MAX + 1);
        assert_eq!(quote("a\nb"), "a?b");
    }
}
