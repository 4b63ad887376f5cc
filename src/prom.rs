//! Prometheus text exposition (format 0.0.4): a writer of metric families, each a HELP and a
//! TYPE line followed by its samples, with label values and help texts escaped as the format
//! requires. `tunnel serve` and `tunnel proxy` render their `--metrics` page with it
//! (`tunnel::metrics`), and `tunnel signal` its /metrics page (`signal::server`, with the
//! relay's and the cluster link's families).

use std::fmt::{Display, Write};

/// The content type of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A family's metric type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }
}

/// A page being written: families in the order they are started, every name with `prefix`.
pub struct Exposition {
    prefix: &'static str,
    text: String,
    /// The family the next samples belong to (its full name).
    family: String,
}

impl Exposition {
    pub fn new(prefix: &'static str) -> Exposition {
        Exposition {
            prefix,
            text: String::new(),
            family: String::new(),
        }
    }

    /// Starts family `name` (without the prefix): its HELP and TYPE lines.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        self.family = format!("{}{name}", self.prefix);
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = write!(
            self.text,
            "# HELP {family} {help}\n# TYPE {family} {}\n",
            kind.name(),
            family = self.family
        );
    }

    /// One sample of the family started last, with these labels (none: `&[]`).
    pub fn sample(&mut self, labels: &[(&str, &str)], value: impl Display) {
        self.text.push_str(&self.family);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (name, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{name}=\"");
                for c in value.chars() {
                    match c {
                        '\\' => self.text.push_str("\\\\"),
                        '"' => self.text.push_str("\\\""),
                        '\n' => self.text.push_str("\\n"),
                        c => self.text.push(c),
                    }
                }
                self.text.push('"');
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }

    /// A family with one sample and no labels.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: impl Display) {
        self.family(name, kind, help);
        self.sample(&[], value);
    }

    /// The page.
    pub fn finish(self) -> String {
        self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_samples_and_escaping() {
        let mut page = Exposition::new("tunnel_");
        page.single("streams_open", Kind::Gauge, "Streams in flight.", 3);
        page.family(
            "bytes_total",
            Kind::Counter,
            "Body bytes.\nBy direction \\.",
        );
        page.sample(&[("direction", "upstream")], 10u64);
        page.sample(&[("direction", "down\"st\\ream\n"), ("peer", "ab")], 0.25);
        assert_eq!(
            page.finish(),
            "# HELP tunnel_streams_open Streams in flight.\n\
             # TYPE tunnel_streams_open gauge\n\
             tunnel_streams_open 3\n\
             # HELP tunnel_bytes_total Body bytes.\\nBy direction \\\\.\n\
             # TYPE tunnel_bytes_total counter\n\
             tunnel_bytes_total{direction=\"upstream\"} 10\n\
             tunnel_bytes_total{direction=\"down\\\"st\\\\ream\\n\",peer=\"ab\"} 0.25\n"
        );
    }

    #[test]
    fn a_family_without_samples_is_still_declared() {
        let mut page = Exposition::new("x_");
        page.family("peer_rtt_seconds", Kind::Gauge, "Round trip.");
        assert_eq!(
            page.finish(),
            "# HELP x_peer_rtt_seconds Round trip.\n# TYPE x_peer_rtt_seconds gauge\n"
        );
    }
}
