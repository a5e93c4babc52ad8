//! Cutting a connection's byte stream into lines of at most a set length, each in a
//! buffer of its own that the session zeroes once it is parsed.

use super::*;

/// Splits the byte stream of a connection into lines of at most `max` bytes. Lines
/// come out as their own writable buffers, so the session can zero each one once it
/// is parsed (tokio-util's line codecs hand out shared, read-only `Bytes`).
///
/// A longer line comes out as [`Frame::TooLong`] once, then its bytes are wiped and
/// dropped as they arrive up to its `\n`: the connection goes on with the next line,
/// and a line without end costs no more memory than `max`.
pub struct LineCodec {
    max: usize,
    /// Where the search for `\n` resumes: bytes before it were already searched.
    searched: usize,
    /// Inside a line that was too long: dropping bytes up to its `\n`.
    discarding: bool,
}

/// What the codec makes of the stream.
pub enum Frame {
    /// One line, without its `\n`.
    Line(bytes::BytesMut),
    /// A line longer than the limit; its bytes are skipped up to its `\n`.
    TooLong,
}

/// Reading a line failed.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl LineCodec {
    /// A codec for lines of at most `max` bytes (the `\n` not counted).
    pub fn new(max: usize) -> Self {
        LineCodec {
            max,
            searched: 0,
            discarding: false,
        }
    }

    /// Drops (wiped: a skipped line may hold a key) the bytes of a skipped line that
    /// are in `buf`; answers whether its `\n` was among them.
    fn skip(&mut self, buf: &mut bytes::BytesMut) -> bool {
        let (n, found) = match memchr::memchr(b'\n', buf) {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        buf[..n].zeroize();
        let _ = buf.split_to(n);
        self.discarding = !found;
        self.searched = 0;
        found
    }
}

impl tokio_util::codec::Decoder for LineCodec {
    type Item = Frame;
    type Error = LineError;

    fn decode(
        &mut self,
        buf: &mut bytes::BytesMut,
    ) -> std::result::Result<Option<Frame>, LineError> {
        if self.discarding && !self.skip(buf) {
            return Ok(None);
        }
        let end = buf.len().min(self.max + 1);
        match memchr::memchr(b'\n', &buf[self.searched.min(end)..end]) {
            Some(i) => {
                let at = self.searched + i;
                self.searched = 0;
                let mut line = buf.split_to(at + 1);
                line.truncate(at);
                Ok(Some(Frame::Line(line)))
            }
            None if buf.len() > self.max => {
                self.skip(buf);
                Ok(Some(Frame::TooLong))
            }
            None => {
                self.searched = end;
                Ok(None)
            }
        }
    }

    fn decode_eof(
        &mut self,
        buf: &mut bytes::BytesMut,
    ) -> std::result::Result<Option<Frame>, LineError> {
        match self.decode(buf)? {
            Some(frame) => Ok(Some(frame)),
            None if buf.is_empty() || self.discarding => {
                self.skip(buf);
                Ok(None)
            }
            // A last line without `\n`, answered at half-close.
            None => {
                self.searched = 0;
                Ok(Some(Frame::Line(buf.split())))
            }
        }
    }
}
