//! Replays the committed fuzz seed corpora (`fuzz/corpus/frame/`, `fuzz/corpus/http1/`,
//! `fuzz/corpus/turn/`, `fuzz/corpus/resp/`) through the fuzz entry points on stable Rust, so `cargo test` catches
//! what the fuzzers once found.

use std::fs;
use std::path::Path;
use tunnel::frame::{HeaderForm, Message};

#[test]
fn frame_corpus_replays_cleanly() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/frame");
    let mut replayed = 0;
    for entry in fs::read_dir(&dir).expect("fuzz/corpus/frame is committed") {
        let path = entry.expect("readable corpus entry").path();
        if !path.is_file() {
            continue;
        }
        let data = fs::read(&path).expect("readable corpus file");
        tunnel::frame::fuzz_one(&data);
        // Seeds named `bad_*` are malformed on purpose; `list_*` seeds carry headers in the
        // list form of the `headers` feature, which only a channel that agreed on it decodes;
        // every other seed is a valid version-1 frame.
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let malformed = name.starts_with("bad_");
        let list_only = name.starts_with("list_");
        assert_eq!(
            Message::decode(&data).is_err(),
            malformed || list_only,
            "{path:?}"
        );
        assert_eq!(
            Message::decode_as(&data, HeaderForm::List).is_err(),
            malformed,
            "{path:?}"
        );
        replayed += 1;
    }
    assert!(replayed >= 10, "only {replayed} corpus files in {dir:?}");
}

#[test]
fn http1_corpus_replays_cleanly() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/http1");
    let mut replayed = 0;
    for entry in fs::read_dir(&dir).expect("fuzz/corpus/http1 is committed") {
        let path = entry.expect("readable corpus entry").path();
        if path.is_file() {
            tunnel::http1::fuzz_one(&fs::read(&path).expect("readable corpus file"));
            replayed += 1;
        }
    }
    assert!(replayed >= 8, "only {replayed} corpus files in {dir:?}");
}

#[test]
fn turn_corpus_replays_cleanly() {
    use tunnel::turn::codec;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/turn");
    let mut replayed = 0;
    for entry in fs::read_dir(&dir).expect("fuzz/corpus/turn is committed") {
        let path = entry.expect("readable corpus entry").path();
        if !path.is_file() {
            continue;
        }
        let data = fs::read(&path).expect("readable corpus file");
        tunnel::turn::fuzz_one(&data);
        // `bad_*` seeds are malformed on purpose, `stream_*` ones are several TCP frames; every
        // other seed is one STUN message or one ChannelData message.
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let whole = codec::Message::parse(&data).is_ok()
            || (codec::is_channel_data(&data) && codec::parse_channel_data(&data).is_some());
        if name.starts_with("stream_") {
            let first = codec::stream_frame_len(&data);
            assert!(
                matches!(first, Ok(Some(n)) if n < data.len()),
                "{path:?}: {first:?}"
            );
        } else {
            assert_eq!(whole, !name.starts_with("bad_"), "{path:?}");
        }
        replayed += 1;
    }
    assert!(replayed >= 15, "only {replayed} corpus files in {dir:?}");
}

#[test]
fn resp_corpus_replays_cleanly() {
    use tunnel::signal::redis;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/resp");
    let mut replayed = 0;
    for entry in fs::read_dir(&dir).expect("fuzz/corpus/resp is committed") {
        let path = entry.expect("readable corpus entry").path();
        if !path.is_file() {
            continue;
        }
        let data = fs::read(&path).expect("readable corpus file");
        redis::fuzz_one(&data);
        // `bad_*` seeds are malformed or cut short on purpose; every other one is one whole
        // reply.
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let whole = matches!(redis::parse(&data), Ok(Some((_, n))) if n == data.len());
        assert_eq!(whole, !name.starts_with("bad_"), "{path:?}");
        replayed += 1;
    }
    assert!(replayed >= 10, "only {replayed} corpus files in {dir:?}");
}
