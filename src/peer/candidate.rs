//! ICE candidates as the signaling dialect carries them: a string holding the JSON text of an
//! `RTCIceCandidateInit` (`{"candidate":"candidate:…","sdpMid":"0","sdpMLineIndex":0,
//! "usernameFragment":"…"}`), or a bare `candidate:…` line. Converts both ways between that form
//! and `str0m::Candidate`. Used by the peer link (`super::Link`).

use serde_json::Value;
use str0m::Candidate;

/// Why an incoming candidate string was not turned into a candidate.
#[derive(Debug, PartialEq, Eq)]
pub enum Skip {
    /// An empty candidate: the remote's end-of-candidates marker.
    Empty,
    /// An mDNS (`*.local`) host name, which would have to be resolved first.
    Mdns(String),
    /// Not a candidate we can parse (text of the error).
    Invalid(String),
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Skip::Empty => write!(f, "empty candidate (end of candidates)"),
            Skip::Mdns(host) => write!(f, "mDNS candidate {host} is not supported"),
            Skip::Invalid(e) => write!(f, "invalid candidate: {e}"),
        }
    }
}

/// Parses an incoming candidate string: JSON text of an `RTCIceCandidateInit`, or a bare
/// `candidate:…` line (optionally prefixed with `a=`).
pub fn parse(text: &str) -> Result<Candidate, Skip> {
    let text = text.trim();
    if text.is_empty() {
        return Err(Skip::Empty);
    }
    if text.starts_with('{') {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| Skip::Invalid(format!("bad candidate JSON: {e}")))?;
        let line = match value.get("candidate") {
            Some(Value::String(s)) => s.as_str(),
            Some(Value::Null) | None => return Err(Skip::Empty),
            Some(_) => return Err(Skip::Invalid("\"candidate\" is not a string".into())),
        };
        let ufrag = value.get("usernameFragment").and_then(Value::as_str);
        parse_line(line, ufrag)
    } else {
        parse_line(text, None)
    }
}

fn parse_line(line: &str, ufrag: Option<&str>) -> Result<Candidate, Skip> {
    let line = line.trim();
    let line = line.strip_prefix("a=").unwrap_or(line);
    if line.is_empty() {
        return Err(Skip::Empty);
    }
    // candidate:<foundation> <component> <proto> <prio> <address> <port> typ <kind> ...
    if let Some(host) = line.split_whitespace().nth(4) {
        if host.to_ascii_lowercase().ends_with(".local") {
            return Err(Skip::Mdns(host.to_string()));
        }
    }
    let mut candidate =
        Candidate::from_sdp_string(line).map_err(|e| Skip::Invalid(e.to_string()))?;
    if candidate.ufrag().is_none() {
        if let Some(ufrag) = ufrag.filter(|u| !u.is_empty()) {
            candidate.set_ufrag(ufrag);
        }
    }
    Ok(candidate)
}

/// The `candidate:…` line of a local candidate, without str0m's trailing `ufrag` attribute (the
/// ufrag travels in `usernameFragment`).
pub fn line(candidate: &Candidate) -> String {
    let mut line = candidate.to_sdp_string();
    if let Some(at) = line.find(" ufrag ") {
        line.truncate(at);
    }
    line
}

/// The JSON text of an `RTCIceCandidateInit` for a local candidate, in the key order browsers
/// and the original client use.
pub fn to_init_json(candidate: &Candidate, sdp_mid: &str, ufrag: &str) -> String {
    format!(
        r#"{{"candidate":{},"sdpMid":{},"sdpMLineIndex":0,"usernameFragment":{}}}"#,
        Value::from(line(candidate)),
        Value::from(sdp_mid),
        Value::from(ufrag),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    const LINE: &str = "candidate:1 1 udp 2113929471 192.0.2.7 40000 typ host";

    #[test]
    fn parses_init_json() {
        let text = format!(
            r#"{{"candidate":"{LINE}","sdpMid":"0","sdpMLineIndex":0,"usernameFragment":"abcd"}}"#
        );
        let c = parse(&text).expect("candidate");
        assert_eq!(c.addr(), "192.0.2.7:40000".parse::<SocketAddr>().unwrap());
        assert_eq!(c.ufrag(), Some("abcd"));
    }

    #[test]
    fn parses_bare_lines() {
        let c = parse(LINE).expect("candidate");
        assert_eq!(c.addr().port(), 40000);
        assert_eq!(c.ufrag(), None);
        let c = parse(&format!("a={LINE} generation 0 ufrag xyz network-id 1")).expect("a=");
        assert_eq!(c.addr().port(), 40000);
        assert_eq!(c.ufrag(), Some("xyz"));
    }

    #[test]
    fn skips_empty_mdns_and_garbage() {
        assert_eq!(parse("").unwrap_err(), Skip::Empty);
        assert_eq!(
            parse(r#"{"candidate":"","sdpMid":"0","sdpMLineIndex":0}"#).unwrap_err(),
            Skip::Empty
        );
        assert_eq!(parse(r#"{"sdpMid":"0"}"#).unwrap_err(), Skip::Empty);
        let mdns = r#"{"candidate":"candidate:9 1 udp 2113937151 0b7c-4f.local 5353 typ host","sdpMid":"0","sdpMLineIndex":0}"#;
        assert_eq!(
            parse(mdns).unwrap_err(),
            Skip::Mdns("0b7c-4f.local".to_string())
        );
        assert!(matches!(parse("c"), Err(Skip::Invalid(_))));
        assert!(matches!(parse("{not json"), Err(Skip::Invalid(_))));
        assert!(matches!(parse(r#"{"candidate":5}"#), Err(Skip::Invalid(_))));
        assert!(matches!(
            parse("candidate:1 1 udp 99999999999 1.2.3.4 5 typ host"),
            Err(Skip::Invalid(_))
        ));
    }

    #[test]
    fn produces_init_json_that_parses_back() {
        let addr: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let mut c = Candidate::host(addr, "udp").unwrap();
        c.set_ufrag("uf1");
        let text = to_init_json(&c, "0", "uf1");
        let value: Value = serde_json::from_str(&text).unwrap();
        let cand = value["candidate"].as_str().unwrap();
        assert!(cand.starts_with("candidate:"), "{cand}");
        assert!(cand.ends_with("127.0.0.1 5000 typ host"), "{cand}");
        assert_eq!(value["sdpMid"], "0");
        assert_eq!(value["sdpMLineIndex"], 0);
        assert_eq!(value["usernameFragment"], "uf1");
        assert!(text.starts_with(r#"{"candidate":"candidate:"#));
        let back = parse(&text).unwrap();
        assert_eq!(back.addr(), addr);
        assert_eq!(back.ufrag(), Some("uf1"));
    }
}
