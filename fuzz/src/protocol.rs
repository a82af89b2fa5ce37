//! The control stream as the host reads it from a hostile guest: the bytes
//! go through [`FrameDecoder`] in fuzzed pieces (at most its `room()` at a
//! time, as the monitor and the client read), and through
//! [`Frame::read_from`].
//!
//! Oracle: no panic; the decoder never holds more than one frame's worth
//! and never stops taking bytes without yielding a frame; both decoders
//! agree frame by frame and on whether the stream is broken; every frame
//! encodes back to bytes that decode to it; a spec or exec payload that
//! parses as JSON survives a round trip.

use hull_protocol::frame::{Frame, FrameDecoder, ProtocolError, HEADER_LEN, MAX_PAYLOAD};
use hull_protocol::spec::{ExecSpec, RunSpec};

use crate::Input;

/// Runs one fuzz input: a byte choosing the piece sizes, then the stream.
///
/// # Panics
/// When the decoders break the oracle (see the [module documentation](self)).
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mut seed = u32::from(input.u8()) | 0x100;
    let stream = input.rest();

    let mut decoder = FrameDecoder::new();
    let mut frames = Vec::new();
    let mut broken = false;
    let mut at = 0;
    'feed: loop {
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(ProtocolError::Invalid(_) | ProtocolError::Version { .. }) => {
                    broken = true;
                    break 'feed;
                }
                Err(e) => panic!("the decoder failed with {e:?}"),
            }
        }
        if at == stream.len() {
            break;
        }
        let room = decoder.room();
        assert!(room > 0, "the decoder is full and yields no frame");
        assert!(room <= HEADER_LEN + MAX_PAYLOAD);
        // xorshift: piece sizes from 1 to 64 bytes.
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        let piece = (1 + usize::try_from(seed % 64).unwrap_or(0))
            .min(room)
            .min(stream.len() - at);
        // Fed, read in place, or a read that would block (which changes
        // nothing), as the monitor and the client read.
        match seed % 3 {
            0 => {
                decoder.feed(&stream[at..at + piece]);
            }
            1 => {
                let n = decoder
                    .fill_with(piece, |b| {
                        let n = b.len().min(piece);
                        b[..n].copy_from_slice(&stream[at..at + n]);
                        Ok(n)
                    })
                    .unwrap_or(0);
                assert_eq!(n, piece, "fill_with took less than offered");
            }
            _ => {
                let blocked =
                    decoder.fill_with(piece, |_| Err(std::io::ErrorKind::WouldBlock.into()));
                assert!(blocked.is_err());
                assert_eq!(decoder.room(), room, "a blocked read changed the decoder");
                continue;
            }
        }
        at += piece;
    }

    let mut reader = stream;
    for frame in &frames {
        match Frame::read_from(&mut reader) {
            Ok(f) => assert_eq!(&f, frame, "the two decoders disagree"),
            Err(e) => panic!("read_from failed with {e:?} where the decoder gave {frame:?}"),
        }
    }
    match Frame::read_from(&mut reader) {
        Err(ProtocolError::Invalid(_) | ProtocolError::Version { .. }) => {}
        Err(ProtocolError::Closed) => assert!(!broken, "read_from saw no error"),
        Err(e) => panic!("read_from failed with {e:?}"),
        Ok(f) => panic!("read_from decoded {f:?} past the decoder's last frame"),
    }

    for frame in frames {
        // Lossy text can grow past the limit; nothing else may fail.
        let Ok(bytes) = frame.encode() else {
            assert!(matches!(
                frame,
                Frame::Failed { .. } | Frame::Note(..) | Frame::Proc(..)
            ));
            continue;
        };
        let again = Frame::read_from(&mut &bytes[..]).unwrap();
        assert_eq!(again, frame, "a frame does not survive encoding");
        match &frame {
            Frame::Spec(json) => round_trip::<RunSpec>(json),
            Frame::Exec(_, json) => round_trip::<ExecSpec>(json),
            _ => {}
        }
    }
}

fn round_trip<T>(json: &[u8])
where
    T: serde::de::DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug,
{
    if let Ok(spec) = serde_json::from_slice::<T>(json) {
        let bytes = serde_json::to_vec(&spec).unwrap();
        let again: T = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(again, spec, "a spec does not survive JSON");
    }
}
