//! Peer authentication, the negotiated feature `auth`: SPAKE2 (RustCrypto's `spake2`, Ed25519
//! group) keyed by a shared secret, run over the data channel inside HELLO / AGREE / AUTH before
//! any request is served, with its transcript bound to both DTLS fingerprints (channel binding)
//! and key confirmation both ways. Sans-IO: the roles (`serve.rs`, `proxy.rs`) call it with the
//! messages and the fingerprints their session negotiated.
//!
//! ```text
//! consumer                                             provider
//!   HELLO  features+["auth"], auth {name, pake: X}  →
//!                                                   ←  AGREE  auth {pake: Y, confirm: MAC_P}
//!   AUTH   MAC_C                                    →  (requests follow on the same channel)
//! ```
//! K is SPAKE2's shared key; T = "tunnel-auth-v1" ‖ name ‖ consumer's fingerprint ‖ provider's
//! fingerprint ‖ X ‖ Y (each length-prefixed), MAC_P = HMAC-SHA256(K, "provider" ‖ T) and
//! MAC_C = HMAC-SHA256(K, "consumer" ‖ T). A man in the middle that terminates both DTLS
//! sessions relays X and Y unchanged, but each side's T names the certificates it saw, so both
//! MACs fail. A wrong secret fails the same way, and each connection tests one guess only: the
//! MACs reveal nothing about other secrets without solving Diffie-Hellman. MACs are compared in
//! constant time; secrets are never logged.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use spake2::{Ed25519Group, Identity, Password, Spake2};

/// The feature name in HELLO / AGREE.
pub const FEATURE: &str = "auth";
const TRANSCRIPT_LABEL: &[u8] = b"tunnel-auth-v1";
const ID_CONSUMER: &[u8] = b"tunnel consumer";
const ID_PROVIDER: &[u8] = b"tunnel provider";
/// Longest consumer name accepted.
pub const MAX_NAME: usize = 64;

type HmacSha256 = Hmac<Sha256>;

/// The DTLS certificate fingerprints of a session, by role (hash function name and digest).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    pub consumer: (String, Vec<u8>),
    pub provider: (String, Vec<u8>),
}

/// Why authentication failed.
#[derive(Debug, PartialEq, Eq)]
pub enum AuthError {
    /// The other side's message is malformed.
    Malformed(&'static str),
    /// The key confirmation did not verify: a different secret, or someone in the middle.
    Mismatch,
}

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthError::Malformed(what) => write!(f, "malformed authentication message ({what})"),
            AuthError::Mismatch => write!(
                f,
                "key confirmation failed: the secrets differ, or someone is in the middle"
            ),
        }
    }
}

fn transcript(name: &str, binding: &Binding, x: &[u8], y: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(256);
    for part in [
        TRANSCRIPT_LABEL,
        name.as_bytes(),
        binding.consumer.0.as_bytes(),
        &binding.consumer.1,
        binding.provider.0.as_bytes(),
        &binding.provider.1,
        x,
        y,
    ] {
        t.extend_from_slice(&(part.len() as u32).to_be_bytes());
        t.extend_from_slice(part);
    }
    t
}

fn mac(key: &[u8], role: &[u8], transcript: &[u8]) -> Result<HmacSha256, AuthError> {
    // HMAC takes keys of any length; this cannot fail.
    let mut m =
        <HmacSha256 as Mac>::new_from_slice(key).map_err(|_| AuthError::Malformed("key"))?;
    m.update(role);
    m.update(transcript);
    Ok(m)
}

/// The consumer's half, from HELLO until AGREE arrives.
pub struct ConsumerAuth {
    spake: Spake2<Ed25519Group>,
    name: String,
    x: Vec<u8>,
}

impl ConsumerAuth {
    /// Starts the exchange; returns the state and X for HELLO.
    pub fn start(secret: &str, name: &str) -> (ConsumerAuth, Vec<u8>) {
        let (spake, x) = Spake2::<Ed25519Group>::start_a(
            &Password::new(secret.as_bytes()),
            &Identity::new(ID_CONSUMER),
            &Identity::new(ID_PROVIDER),
        );
        let state = ConsumerAuth {
            spake,
            name: name.to_string(),
            x: x.clone(),
        };
        (state, x)
    }

    /// AGREE's Y and MAC_P: verifies the provider and returns MAC_C for the AUTH frame.
    pub fn finish(self, y: &[u8], confirm: &[u8], binding: &Binding) -> Result<Vec<u8>, AuthError> {
        let key = self
            .spake
            .finish(y)
            .map_err(|_| AuthError::Malformed("pake"))?;
        let t = transcript(&self.name, binding, &self.x, y);
        mac(&key, b"provider", &t)?
            .verify_slice(confirm)
            .map_err(|_| AuthError::Mismatch)?;
        Ok(mac(&key, b"consumer", &t)?.finalize().into_bytes().to_vec())
    }
}

/// The provider's half, from AGREE until AUTH arrives.
pub struct ProviderAuth {
    key: Vec<u8>,
    transcript: Vec<u8>,
}

impl ProviderAuth {
    /// HELLO's name and X: returns the state, Y and MAC_P for AGREE.
    pub fn respond(
        secret: &str,
        name: &str,
        x: &[u8],
        binding: &Binding,
    ) -> Result<(ProviderAuth, Vec<u8>, Vec<u8>), AuthError> {
        let (spake, y) = Spake2::<Ed25519Group>::start_b(
            &Password::new(secret.as_bytes()),
            &Identity::new(ID_CONSUMER),
            &Identity::new(ID_PROVIDER),
        );
        let key = spake.finish(x).map_err(|_| AuthError::Malformed("pake"))?;
        let t = transcript(name, binding, x, &y);
        let confirm = mac(&key, b"provider", &t)?.finalize().into_bytes().to_vec();
        Ok((ProviderAuth { key, transcript: t }, y, confirm))
    }

    /// AUTH's MAC_C, compared in constant time.
    pub fn verify(&self, confirm: &[u8]) -> Result<(), AuthError> {
        mac(&self.key, b"consumer", &self.transcript)?
            .verify_slice(confirm)
            .map_err(|_| AuthError::Mismatch)
    }
}

/// The provider's secrets: one for everybody (`--secret`), or one per consumer name
/// (`--secret-file`, `name secret` per line, `#` comments).
#[derive(Clone, Debug, Default)]
pub enum Secrets {
    /// No authentication: anyone in the room is served.
    #[default]
    Open,
    Shared(String),
    PerName(HashMap<String, String>),
}

impl Secrets {
    /// Parses a secret file's text. Errors name the line.
    pub fn parse_file(text: &str) -> Result<Secrets, String> {
        let mut names = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(name), Some(secret), None) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(format!(
                    "line {}: expected `name secret` (two words)",
                    i + 1
                ));
            };
            if name.len() > MAX_NAME {
                return Err(format!("line {}: name longer than {MAX_NAME}", i + 1));
            }
            if names.insert(name.to_string(), secret.to_string()).is_some() {
                return Err(format!("line {}: name '{name}' given twice", i + 1));
            }
        }
        if names.is_empty() {
            return Err("no `name secret` line".into());
        }
        Ok(Secrets::PerName(names))
    }

    /// Reads and parses a secret file (at start and on SIGHUP); errors name `what` and the
    /// path.
    pub fn load(path: &std::path::Path, what: &str) -> Result<Secrets, String> {
        let shown = path.display();
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("cannot read {what}{shown}: {e}"))?;
        Secrets::parse_file(&text).map_err(|e| format!("{what}{shown}: {e}"))
    }

    pub fn required(&self) -> bool {
        !matches!(self, Secrets::Open)
    }

    /// The secret for `name`; `None` when the name is unknown (or nothing is required).
    pub fn for_name(&self, name: &str) -> Option<&str> {
        match self {
            Secrets::Open => None,
            Secrets::Shared(s) => Some(s),
            Secrets::PerName(m) => m.get(name).map(String::as_str),
        }
    }
}

/// Consecutive failures after which a name waits [`MAX_NAME_DELAY`].
const NAME_BASE_DELAY: Duration = Duration::from_secs(1);
const MAX_NAME_DELAY: Duration = Duration::from_secs(300);
/// Failures per minute across all names (the room) before every attempt waits.
pub const ROOM_FAILURES_PER_MINUTE: usize = 20;

/// Slows repeated failures: per consumer name, a delay that doubles with each failure (1 s up
/// to 5 min, reset by a success); per room, at most [`ROOM_FAILURES_PER_MINUTE`] failures a
/// minute.
#[derive(Default)]
pub struct Throttle {
    names: HashMap<String, (u32, Instant)>,
    recent: Vec<Instant>,
}

impl Throttle {
    /// `Err(wait)` when an attempt for `name` must wait.
    pub fn check(&mut self, name: &str, now: Instant) -> Result<(), Duration> {
        self.recent
            .retain(|t| now.saturating_duration_since(*t) < Duration::from_secs(60));
        if self.recent.len() >= ROOM_FAILURES_PER_MINUTE {
            let oldest = self.recent.iter().min().copied().unwrap_or(now);
            return Err(Duration::from_secs(60).saturating_sub(now - oldest));
        }
        match self.names.get(name) {
            Some((_, until)) if *until > now => Err(*until - now),
            _ => Ok(()),
        }
    }

    pub fn failed(&mut self, name: &str, now: Instant) {
        self.recent.push(now);
        // Bounded: an attacker inventing names fills at most this many entries.
        if self.names.len() > 4096 {
            self.names.retain(|_, (_, until)| *until > now);
        }
        let entry = self.names.entry(name.to_string()).or_insert((0, now));
        entry.0 = entry.0.saturating_add(1);
        let delay = NAME_BASE_DELAY
            .saturating_mul(1 << entry.0.saturating_sub(1).min(16))
            .min(MAX_NAME_DELAY);
        entry.1 = now + delay;
    }

    pub fn succeeded(&mut self, name: &str) {
        self.names.remove(name);
    }
}

/// A fresh random secret for `tunnel secret`: 100 bits as 20 lowercase base-32 characters in
/// groups of five.
pub fn generate_secret() -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijkmnpqrstuvwxyz23456789";
    let mut bytes = [0u8; 20];
    crate::util::random_bytes(&mut bytes);
    let chars: Vec<char> = bytes
        .iter()
        .map(|b| ALPHABET[(b & 31) as usize] as char)
        .collect();
    chars
        .chunks(5)
        .map(|c| c.iter().collect::<String>())
        .collect::<Vec<_>>()
        .join("-")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(c: u8, p: u8) -> Binding {
        Binding {
            consumer: ("sha-256".into(), vec![c; 32]),
            provider: ("sha-256".into(), vec![p; 32]),
        }
    }

    fn run(consumer: &str, provider: &str, bc: &Binding, bp: &Binding) -> Result<(), String> {
        let (c, x) = ConsumerAuth::start(consumer, "alice");
        let (p, y, confirm) =
            ProviderAuth::respond(provider, "alice", &x, bp).map_err(|e| e.to_string())?;
        let mac_c = c
            .finish(&y, &confirm, bc)
            .map_err(|e| format!("consumer: {e}"))?;
        p.verify(&mac_c).map_err(|e| format!("provider: {e}"))
    }

    #[test]
    fn same_secret_same_certificates_succeeds() {
        let b = binding(1, 2);
        assert_eq!(run("correct horse", "correct horse", &b, &b), Ok(()));
    }

    #[test]
    fn wrong_secret_fails_at_the_consumer() {
        let b = binding(1, 2);
        let err = run("correct horse", "battery staple", &b, &b).unwrap_err();
        assert!(
            err.starts_with("consumer: key confirmation failed"),
            "{err}"
        );
    }

    #[test]
    fn a_man_in_the_middle_is_caught_by_the_binding() {
        // Each side saw a different certificate for the other: the MITM's.
        let err = run("s", "s", &binding(1, 9), &binding(8, 2)).unwrap_err();
        assert!(err.contains("key confirmation failed"), "{err}");
    }

    #[test]
    fn the_provider_rejects_a_wrong_consumer_mac_and_garbage() {
        let b = binding(1, 2);
        let (_, x) = ConsumerAuth::start("s", "n");
        let (p, _, _) = ProviderAuth::respond("s", "n", &x, &b).unwrap();
        assert_eq!(p.verify(&[0u8; 32]), Err(AuthError::Mismatch));
        assert_eq!(p.verify(b""), Err(AuthError::Mismatch));
        assert!(matches!(
            ProviderAuth::respond("s", "n", b"short", &b),
            Err(AuthError::Malformed(_))
        ));
        let (c, _) = ConsumerAuth::start("s", "n");
        assert!(matches!(
            c.finish(&[0x42; 33], &[0; 32], &b),
            Err(AuthError::Malformed(_)) | Err(AuthError::Mismatch)
        ));
    }

    #[test]
    fn secret_files() {
        let s = Secrets::parse_file("# team\nalice  s3cret\n\nbob other\n").unwrap();
        assert_eq!(s.for_name("alice"), Some("s3cret"));
        assert_eq!(s.for_name("carol"), None);
        assert!(Secrets::parse_file("alice").unwrap_err().contains("line 1"));
        assert!(Secrets::parse_file("a b c")
            .unwrap_err()
            .contains("two words"));
        assert!(Secrets::parse_file("a b\na c")
            .unwrap_err()
            .contains("twice"));
        assert!(Secrets::parse_file("# nothing\n").is_err());
        assert_eq!(Secrets::Shared("x".into()).for_name("any"), Some("x"));
        assert!(!Secrets::Open.required());
    }

    #[test]
    fn throttle_doubles_per_name_and_caps_the_room() {
        let mut t = Throttle::default();
        let now = Instant::now();
        assert!(t.check("a", now).is_ok());
        t.failed("a", now);
        assert_eq!(t.check("a", now), Err(Duration::from_secs(1)));
        t.failed("a", now);
        assert_eq!(t.check("a", now), Err(Duration::from_secs(2)));
        assert!(t.check("b", now).is_ok(), "other names unaffected");
        t.succeeded("a");
        assert!(t.check("a", now).is_ok());
        for i in 0..ROOM_FAILURES_PER_MINUTE {
            t.failed(&format!("n{i}"), now);
        }
        assert!(t.check("fresh", now).is_err(), "the room waits");
        assert!(t.check("fresh", now + Duration::from_secs(61)).is_ok());
    }

    #[test]
    fn generated_secrets_look_right() {
        let s = generate_secret();
        assert_eq!(s.len(), 23);
        assert_eq!(s.split('-').count(), 4);
        assert_ne!(s, generate_secret());
    }
}
