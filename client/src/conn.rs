//! One keep-alive HTTP/1.1 connection to a node, driven by the task whose
//! request it carries: the request written in one write, its answer read
//! and parsed in the same task, with no task or channel in between.
//!
//! Written by hand (with `httparse` for the answer's head) rather than on
//! hyper's client connection, because the client is the load generator of
//! `bench/cluster.sh` as much as a library, and hyper's connection cost more
//! than the node it drove: a task per connection, the request and answer
//! channels between it and the caller, and a channel for each answer's body
//! were most of the client's user-space CPU per GET (`bench/HISTORY.md`,
//! session 51, has the figures). What the client needs of HTTP/1.1 is
//! small and is all here: a request with a `Content-Length` body, an answer
//! with one (or read to the connection's end), `Connection: close`, and
//! bounds on the head and the body.

use std::future::Future;
use std::io::{self, Write as _};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderValue, Method, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::pool::Failed;
use crate::tls::Watched;

/// Largest answer head read.
const MAX_HEAD_BYTES: usize = 64 << 10;
/// Most header lines an answer may have.
const MAX_HEADERS: usize = 32;
/// What a read asks the socket for at least.
const READ_CHUNK: usize = 8 << 10;
/// Largest buffer a connection keeps between requests.
const KEPT_BUFFER_BYTES: usize = 64 << 10;
/// How long an answer that came before the request was written in full
/// is waited for, once the write failed.
const EARLY_ANSWER_WAIT: Duration = Duration::from_millis(200);

/// A connection's byte stream: plain TCP, or TLS that keeps the alert a
/// node refuses the client's certificate with. An enum rather than a boxed
/// trait object: every request's reads and writes go through it.
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<Watched>),
}

/// What a request needs beyond its body: the node's `Host` and the token
/// are made once and shared by every request.
pub(crate) struct Head<'a> {
    pub method: &'a Method,
    /// The path and query, already percent-encoded.
    pub path: &'a str,
    pub host: &'a HeaderValue,
    pub token: Option<&'a HeaderValue>,
    pub body: &'a [u8],
}

/// An answer read in full.
#[derive(Debug)]
pub(crate) struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
    /// `x-distrocache-epoch`, when present and a number.
    pub epoch: Option<u64>,
    /// `x-distrocache-served-by` as it came.
    pub served_by: Option<HeaderValue>,
}

pub(crate) struct Conn {
    stream: Stream,
    /// What the node sent, and the answer read out of it.
    inbox: Inbox,
    /// The request being written, its buffer kept for the next one.
    write: Vec<u8>,
}

/// The answer read out of the bytes a connection receives: the half of the
/// connection that does no I/O, so that any bytes can be tried on it.
struct Inbox {
    /// Bytes read and not yet taken: between requests, none.
    read: BytesMut,
    /// The node said it closes the connection after this answer (or it
    /// answered HTTP/1.0, or the answer ran to the connection's end), or
    /// the connection failed.
    closing: bool,
    /// The request was a HEAD: its answer has no body, whatever its head says.
    head_only: bool,
}

/// How an answer's body ends.
enum BodyEnd {
    Length(usize),
    /// No length: the body runs to the end of the connection.
    Close,
}

impl Conn {
    pub(crate) fn new(stream: Stream) -> Self {
        Self {
            stream,
            inbox: Inbox {
                read: BytesMut::with_capacity(READ_CHUNK),
                closing: false,
                head_only: false,
            },
            write: Vec::with_capacity(512),
        }
    }

    /// Whether the connection may be kept once its answer has been read: the
    /// node did not say it closes it, and nothing came after the answer.
    pub(crate) fn may_keep(&self) -> bool {
        !self.inbox.closing && self.inbox.read.is_empty()
    }

    /// Whether an idle connection can carry another request: it may be
    /// kept, and an idle read finds nothing (the node closing
    /// it, or bytes no request asked for, mean it cannot). The read is a
    /// poll that returns at once: with no news from the socket, tokio does
    /// not even make a system call. It is polled outside tokio's budget: a
    /// task whose budget ran out would otherwise be told "pending" without
    /// the socket being looked at.
    pub(crate) fn is_reusable(&mut self) -> bool {
        if !self.may_keep() {
            return false;
        }
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        let stream = &mut self.stream;
        let read = std::future::poll_fn(|cx| Pin::new(&mut *stream).poll_read(cx, &mut buf));
        let mut read = std::pin::pin!(tokio::task::unconstrained(read));
        let mut cx = Context::from_waker(Waker::noop());
        matches!(read.as_mut().poll(&mut cx), Poll::Pending)
    }

    /// Sends one request and reads its answer in full, the body at most
    /// `max_body` bytes. A request that could not be written in full never
    /// reached the node as a request (a node acts only on a complete one):
    /// [`Failed::NotSent`]. Once it is written, any failure is
    /// [`Failed::Lost`]: the node may have acted on it.
    pub(crate) async fn send(
        &mut self,
        head: &Head<'_>,
        max_body: usize,
    ) -> Result<Answer, Failed> {
        self.encode(head);
        let written = match self.stream.write_all(&self.write).await {
            Ok(()) => self.stream.flush().await,
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            self.inbox.closing = true;
            // A node may answer before it has read the whole request (a
            // body over its limit: 413) and close: its answer, if it came,
            // is the request's outcome. Otherwise the request is incomplete
            // on the node's side, which acts only on a whole one.
            if let Ok(Ok(answer)) =
                tokio::time::timeout(EARLY_ANSWER_WAIT, self.read_answer(max_body)).await
            {
                return Ok(answer);
            }
            return Err(Failed::NotSent(format!("writing the request: {e}")));
        }
        let answer = self.read_answer(max_body).await;
        // A large request or answer does not stay with the connection.
        if self.inbox.read.capacity() > KEPT_BUFFER_BYTES {
            self.inbox.read = BytesMut::with_capacity(READ_CHUNK);
        }
        if self.write.capacity() > KEPT_BUFFER_BYTES {
            self.write = Vec::new();
        }
        answer.map_err(|e| {
            self.inbox.closing = true;
            Failed::Lost(e)
        })
    }

    fn encode(&mut self, head: &Head<'_>) {
        self.inbox.head_only = head.method == Method::HEAD;
        let w = &mut self.write;
        w.clear();
        w.extend_from_slice(head.method.as_str().as_bytes());
        w.push(b' ');
        w.extend_from_slice(head.path.as_bytes());
        w.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        w.extend_from_slice(head.host.as_bytes());
        if let Some(token) = head.token {
            w.extend_from_slice(b"\r\nauthorization: ");
            w.extend_from_slice(token.as_bytes());
        }
        if !head.body.is_empty() {
            w.extend_from_slice(b"\r\ncontent-type: application/json");
        }
        // Every request but a GET says its length, as hyper's client did:
        // a DELETE or a POST without a body says 0.
        if !head.body.is_empty() || head.method != Method::GET {
            // Writing into a Vec cannot fail.
            let _ = write!(w, "\r\ncontent-length: {}", head.body.len());
        }
        w.extend_from_slice(b"\r\n\r\n");
        w.extend_from_slice(head.body);
    }

    async fn read_answer(&mut self, max_body: usize) -> Result<Answer, String> {
        loop {
            if let Some(answer) = self.inbox.parse(max_body)? {
                return Ok(answer);
            }
            self.inbox.read.reserve(READ_CHUNK);
            let n = self
                .stream
                .read_buf(&mut self.inbox.read)
                .await
                .map_err(|e| format!("reading the answer: {e}"))?;
            if n == 0 {
                return self.inbox.at_end(max_body);
            }
        }
    }
}

impl Inbox {
    /// The answer in `self.read` once it is whole (its bytes taken), or
    /// `None` while more must be read.
    fn parse(&mut self, max_body: usize) -> Result<Option<Answer>, String> {
        let Some((head_len, fields, end)) = self.parse_head(max_body)? else {
            return Ok(None);
        };
        let BodyEnd::Length(length) = end else {
            // Read to the end of the connection (`at_end`).
            return Ok(None);
        };
        if self.read.len() < head_len + length {
            return Ok(None);
        }
        // The body copied out: the read buffer stays the connection's own,
        // reused for the next answer rather than shared with this one's.
        let body = Bytes::copy_from_slice(&self.read[head_len..head_len + length]);
        self.read.advance(head_len + length);
        if !self.read.is_empty() {
            // Bytes after the answer that no request asked for.
            self.closing = true;
        }
        Ok(Some(fields.with_body(body)))
    }

    /// The connection ended: the answer that runs to its end is whole;
    /// any other is cut short.
    fn at_end(&mut self, max_body: usize) -> Result<Answer, String> {
        match self.parse_head(max_body)? {
            Some((head_len, fields, BodyEnd::Close)) => {
                let body = self.read.split_off(head_len).freeze();
                self.read.clear();
                Ok(fields.with_body(body))
            }
            Some(_) => Err("the connection closed in the middle of the answer".into()),
            None if self.read.is_empty() => Err("the connection closed before an answer".into()),
            None => Err("the connection closed in the middle of the answer's head".into()),
        }
    }

    /// The length of the whole informational answer at the start of
    /// `self.read`, if that is what is there. The client asks for no
    /// upgrade: a 101 is refused.
    fn informational_head(&self) -> Result<Option<usize>, String> {
        // "HTTP/1.1 1xx": the status's first digit, looked at before a
        // second parse of every answer's head.
        if self.read.get(9) != Some(&b'1') {
            return Ok(None);
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        let Some(n) = parse_into(&self.read, &mut response)? else {
            return Ok(None);
        };
        match response.code.unwrap_or(0) {
            101 => Err("an unexpected 101 answer".into()),
            code if code < 200 => Ok(Some(n)),
            _ => Ok(None),
        }
    }

    /// The answer's head, once it is whole: its length, what the client
    /// keeps of it, and how its body ends.
    fn parse_head(&mut self, max_body: usize) -> Result<Option<(usize, Fields, BodyEnd)>, String> {
        // Informational answers (100, 103) before the real one are skipped.
        while let Some(informational) = self.informational_head()? {
            self.read.advance(informational);
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        let head_len = match parse_into(&self.read, &mut response)? {
            Some(n) => n,
            None => return Ok(None),
        };
        let code = response.code.unwrap_or(0);
        let status =
            StatusCode::from_u16(code).map_err(|_| format!("an answer with status {code}"))?;
        let mut fields = Fields {
            status,
            epoch: None,
            served_by: None,
        };
        if response.version != Some(1) {
            self.closing = true;
        }
        let mut length = None;
        for h in response.headers.iter() {
            let name = h.name;
            if name.eq_ignore_ascii_case("content-length") {
                let n = std::str::from_utf8(h.value)
                    .ok()
                    .map(str::trim)
                    .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|v| v.parse::<usize>().ok())
                    .ok_or("an answer with an invalid content-length")?;
                if length.is_some_and(|l| l != n) {
                    return Err("an answer with two content-lengths".into());
                }
                length = Some(n);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                // A node answers with a length; nothing in between may
                // re-encode the answer (no proxy, no compression).
                return Err("an answer with a transfer-encoding".into());
            } else if name.eq_ignore_ascii_case("connection") {
                if h.value
                    .split(|&b| b == b',')
                    .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"))
                {
                    self.closing = true;
                }
            } else if name.eq_ignore_ascii_case(crate::EPOCH_HEADER) {
                fields.epoch = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.parse().ok());
            } else if name.eq_ignore_ascii_case(crate::SERVED_BY_HEADER) {
                fields.served_by = HeaderValue::from_bytes(h.value).ok();
            }
        }
        // 204 and 304 carry no body whatever the head says, nor does the
        // answer to a HEAD.
        let end = match length {
            _ if code == 204 || code == 304 || self.head_only => BodyEnd::Length(0),
            Some(n) if n > max_body => {
                return Err(format!("an answer of {n} bytes, over {max_body}"));
            }
            Some(n) => BodyEnd::Length(n),
            None => {
                self.closing = true;
                if self.read.len() - head_len > max_body {
                    return Err(format!("an answer over {max_body} bytes"));
                }
                BodyEnd::Close
            }
        };
        Ok(Some((head_len, fields, end)))
    }
}

/// The head at the start of `read` parsed into `response`: its length once
/// it is whole, `None` while more must be read.
fn parse_into<'b>(
    read: &'b [u8],
    response: &mut httparse::Response<'_, 'b>,
) -> Result<Option<usize>, String> {
    match response.parse(read) {
        Ok(httparse::Status::Complete(n)) => Ok(Some(n)),
        Ok(httparse::Status::Partial) if read.len() > MAX_HEAD_BYTES => {
            Err(format!("an answer's head over {MAX_HEAD_BYTES} bytes"))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(format!("a malformed answer: {e}")),
    }
}

/// What the client keeps of an answer's head.
struct Fields {
    status: StatusCode,
    epoch: Option<u64>,
    served_by: Option<HeaderValue>,
}

impl Fields {
    fn with_body(self, body: Bytes) -> Answer {
        Answer {
            status: self.status,
            body,
            epoch: self.epoch,
            served_by: self.served_by,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    const LIMIT: usize = 1 << 20;

    /// A connection to a loopback socket the test plays the node on.
    async fn pair() -> (Conn, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (
            Conn::new(Stream::Plain(client.unwrap())),
            accepted.unwrap().0,
        )
    }

    fn get(path: &str) -> (Method, String, HeaderValue) {
        (
            Method::GET,
            path.to_owned(),
            HeaderValue::from_static("n1:8080"),
        )
    }

    /// Reads one request's bytes as the node would see them: up to the end
    /// of its head, and `body` bytes after it.
    async fn read_request(node: &mut TcpStream, body: usize) -> String {
        let mut got = Vec::new();
        let mut byte = [0u8; 1];
        while !got.ends_with(b"\r\n\r\n") {
            node.read_exact(&mut byte).await.unwrap();
            got.push(byte[0]);
        }
        let mut rest = vec![0u8; body];
        node.read_exact(&mut rest).await.unwrap();
        got.extend_from_slice(&rest);
        String::from_utf8(got).unwrap()
    }

    #[tokio::test]
    async fn a_request_is_written_as_http_1_1_with_its_length_and_token() {
        let (mut conn, mut node) = pair().await;
        let token = HeaderValue::from_static("Bearer t0k");
        let host = HeaderValue::from_static("10.0.0.1:8080");
        let body = br#"{"value":1}"#;
        let head = Head {
            method: &Method::PUT,
            path: "/api/v1/cache/a%2Fb",
            host: &host,
            token: Some(&token),
            body,
        };
        let served = tokio::spawn(async move {
            let request = read_request(&mut node, body.len()).await;
            node.write_all(b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}")
                .await
                .unwrap();
            (request, node)
        });
        let answer = conn.send(&head, LIMIT).await.unwrap();
        let (request, _node) = served.await.unwrap();
        assert_eq!(
            request,
            "PUT /api/v1/cache/a%2Fb HTTP/1.1\r\nhost: 10.0.0.1:8080\r\n\
             authorization: Bearer t0k\r\ncontent-type: application/json\r\n\
             content-length: 11\r\n\r\n{\"value\":1}"
        );
        assert_eq!(answer.status, StatusCode::CREATED);
        assert_eq!(&answer.body[..], b"{}");

        // A GET says no length; a DELETE says 0.
        let (method, path, host) = get("/k");
        let (mut conn, mut node) = pair().await;
        for (method, expected) in [
            (method, "GET /k HTTP/1.1\r\nhost: n1:8080\r\n\r\n"),
            (
                Method::DELETE,
                "DELETE /k HTTP/1.1\r\nhost: n1:8080\r\ncontent-length: 0\r\n\r\n",
            ),
        ] {
            let head = Head {
                method: &method,
                path: &path,
                host: &host,
                token: None,
                body: b"",
            };
            let (answer, request) = tokio::join!(conn.send(&head, LIMIT), async {
                let request = read_request(&mut node, 0).await;
                node.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    .await
                    .unwrap();
                request
            });
            assert_eq!(request, expected);
            assert_eq!(answer.unwrap().status, StatusCode::OK);
            assert!(conn.may_keep());
        }

        // A HEAD's answer says the length of a body it does not carry.
        let head = Head {
            method: &Method::HEAD,
            path: &path,
            host: &host,
            token: None,
            body: b"",
        };
        let (answer, ()) = tokio::join!(conn.send(&head, LIMIT), async {
            read_request(&mut node, 0).await;
            node.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
                .await
                .unwrap();
        });
        assert!(answer.unwrap().body.is_empty());
        assert!(conn.may_keep());
    }

    #[tokio::test]
    async fn an_answer_in_pieces_is_read_whole_with_the_headers_the_client_keeps() {
        let (mut conn, mut node) = pair().await;
        let (method, path, host) = get("/api/v1/cache/k");
        let head = Head {
            method: &method,
            path: &path,
            host: &host,
            token: None,
            body: b"",
        };
        let answer = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                      X-DistroCache-Epoch: 42\r\nx-distrocache-served-by: node-b\r\n\
                      Content-Length: 12\r\n\r\n{\"key\":\"k\"}\n";
        let (got, ()) = tokio::join!(conn.send(&head, LIMIT), async {
            read_request(&mut node, 0).await;
            for piece in answer.as_bytes().chunks(7) {
                node.write_all(piece).await.unwrap();
                node.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        let got = got.unwrap();
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(&got.body[..], b"{\"key\":\"k\"}\n");
        assert_eq!(got.epoch, Some(42));
        assert_eq!(got.served_by.unwrap(), "node-b");
        assert!(conn.may_keep());
        assert!(conn.is_reusable(), "an open, quiet connection is reused");

        // The next request on the same connection gets its own answer.
        let (got, ()) = tokio::join!(conn.send(&head, LIMIT), async {
            read_request(&mut node, 0).await;
            node.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n{}")
                .await
                .unwrap();
        });
        let got = got.unwrap();
        assert_eq!((got.status, got.epoch), (StatusCode::NOT_FOUND, None));
    }

    #[tokio::test]
    async fn a_connection_that_closes_or_says_so_is_not_kept() {
        let (method, path, host) = get("/k");
        let head = Head {
            method: &method,
            path: &path,
            host: &host,
            token: None,
            body: b"",
        };
        // What the node sends, whether it then closes, and the body read.
        let cases: [(&str, &[u8], bool, &[u8]); 4] = [
            (
                "`Connection: close`",
                b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\nx",
                false,
                b"x",
            ),
            (
                "`close` among other tokens, an informational answer first",
                b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n\
                  HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\ncontent-length: 1\r\n\r\ny",
                false,
                b"y",
            ),
            (
                "no length: the body runs to the connection's end",
                b"HTTP/1.1 200 OK\r\n\r\nall of it",
                true,
                b"all of it",
            ),
            (
                "bytes after the answer that no request asked for",
                b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nxHTTP/1.1",
                false,
                b"x",
            ),
        ];
        for (what, answer, then_close, body) in cases {
            let (mut conn, mut node) = pair().await;
            // The node's side is held until the answer has been read.
            let (got, _node) = tokio::join!(conn.send(&head, LIMIT), async {
                read_request(&mut node, 0).await;
                node.write_all(answer).await.unwrap();
                if then_close {
                    node.shutdown().await.unwrap();
                }
                node
            });
            assert_eq!(&got.unwrap().body[..], body, "{what}");
            assert!(!conn.may_keep(), "{what}");
        }

        // An idle connection the node closed is found out before it is used.
        let (mut conn, mut node) = pair().await;
        let (got, ()) = tokio::join!(conn.send(&head, LIMIT), async {
            read_request(&mut node, 0).await;
            node.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
        });
        got.unwrap();
        assert!(conn.is_reusable());
        drop(node);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while conn.is_reusable() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the node's close was never noticed"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A node that refuses a body over its limit answers before reading it
    /// all and closes: that answer is the request's outcome, not a failure
    /// to send it.
    #[tokio::test]
    async fn an_answer_that_comes_before_the_request_was_written_is_returned() {
        let (mut conn, mut node) = pair().await;
        let host = HeaderValue::from_static("n1:8080");
        let body = vec![b'v'; 16 << 20];
        let head = Head {
            method: &Method::PUT,
            path: "/api/v1/cache/big",
            host: &host,
            token: None,
            body: &body,
        };
        let (got, ()) = tokio::join!(conn.send(&head, LIMIT), async {
            let mut byte = [0u8; 1];
            let mut got = Vec::new();
            while !got.ends_with(b"\r\n\r\n") {
                node.read_exact(&mut byte).await.unwrap();
                got.push(byte[0]);
            }
            let refusal = r#"{"error":"body over 2097152 bytes"}"#;
            let answer = format!(
                "HTTP/1.1 413 Payload Too Large\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{refusal}",
                refusal.len()
            );
            node.write_all(answer.as_bytes()).await.unwrap();
            drop(node);
        });
        let got = got.expect("the node's answer");
        assert_eq!(got.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(!conn.may_keep());
    }

    fn inbox() -> Inbox {
        Inbox {
            read: BytesMut::new(),
            closing: false,
            head_only: false,
        }
    }

    /// Feeds `pieces` to an inbox as reads would, then the connection's
    /// end: the answer, or the error, and whether the connection may be
    /// kept.
    fn read_pieces(pieces: &[&[u8]], limit: usize) -> (Result<Answer, String>, bool) {
        let mut inbox = inbox();
        for piece in pieces {
            inbox.read.extend_from_slice(piece);
            match inbox.parse(limit) {
                Ok(Some(answer)) => {
                    let keep = !inbox.closing && inbox.read.is_empty();
                    return (Ok(answer), keep);
                }
                Ok(None) => {}
                Err(e) => return (Err(e), false),
            }
        }
        (inbox.at_end(limit), false)
    }

    proptest::proptest! {
        /// Whatever a node sends, in whatever pieces: no panic, an answer
        /// within the limit or an error.
        #[test]
        fn any_bytes_give_an_answer_within_the_limit_or_an_error(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..4096),
            cut in 0usize..4096,
            limit in 0usize..2048,
        ) {
            let cut = cut.min(bytes.len());
            let (got, _) = read_pieces(&[&bytes[..cut], &bytes[cut..]], limit);
            if let Ok(answer) = got {
                proptest::prop_assert!(answer.body.len() <= limit);
            }
        }

        /// A well-formed answer, split anywhere, reads back as it was sent,
        /// and leaves the connection fit for the next one.
        #[test]
        fn an_answer_split_anywhere_reads_back_whole(
            code in 200u16..600,
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..1024),
            epoch in proptest::option::of(proptest::num::u64::ANY),
            informational in proptest::bool::ANY,
            cut in 0usize..2048,
        ) {
            proptest::prop_assume!(code != 204 && code != 304);
            let mut sent = Vec::new();
            if informational {
                sent.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
            }
            let _ = write!(sent, "HTTP/1.1 {code} X\r\ncontent-length: {}\r\n", body.len());
            if let Some(epoch) = epoch {
                let _ = write!(sent, "x-distrocache-epoch: {epoch}\r\n");
            }
            sent.extend_from_slice(b"\r\n");
            sent.extend_from_slice(&body);
            let cut = cut.min(sent.len());
            let (got, keep) = read_pieces(&[&sent[..cut], &sent[cut..]], 1024);
            let got = got.unwrap();
            proptest::prop_assert_eq!(got.status.as_u16(), code);
            proptest::prop_assert_eq!(&got.body[..], &body[..]);
            proptest::prop_assert_eq!(got.epoch, epoch);
            proptest::prop_assert!(keep);
        }
    }

    /// Informational answers one after another are skipped in a loop, not
    /// by recursion: a node cannot exhaust the stack with them.
    #[test]
    fn many_informational_answers_are_skipped() {
        let mut sent = b"HTTP/1.1 100 Continue\r\n\r\n".repeat(100_000);
        sent.extend_from_slice(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nz");
        let (got, keep) = read_pieces(&[&sent], 16);
        assert_eq!(&got.unwrap().body[..], b"z");
        assert!(keep);
    }

    /// Every bad answer is an error of a request that may have been acted
    /// on, and the connection is not kept.
    #[tokio::test]
    async fn a_bad_or_cut_answer_fails_as_lost() {
        let (method, path, host) = get("/k");
        let head = Head {
            method: &method,
            path: &path,
            host: &host,
            token: None,
            body: b"",
        };
        let long_head = format!(
            "HTTP/1.1 200 OK\r\nx-pad: {}\r\n",
            "p".repeat(MAX_HEAD_BYTES)
        );
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "cut in the body",
                b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc".to_vec(),
                "middle of the answer",
            ),
            (
                "cut in the head",
                b"HTTP/1.1 200 OK\r\ncontent-len".to_vec(),
                "answer's head",
            ),
            ("nothing", Vec::new(), "before an answer"),
            ("not HTTP", b"SSH-2.0-OpenSSH\r\n\r\n".to_vec(), "malformed"),
            (
                "too long",
                b"HTTP/1.1 200 OK\r\ncontent-length: 2000000\r\n\r\n".to_vec(),
                "over 1048576",
            ),
            (
                "chunked",
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec(),
                "transfer-encoding",
            ),
            (
                "bad length",
                b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n".to_vec(),
                "invalid content-length",
            ),
            (
                "two lengths",
                b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n".to_vec(),
                "two content-lengths",
            ),
            (
                "an upgrade",
                b"HTTP/1.1 101 Switching Protocols\r\n\r\n".to_vec(),
                "unexpected 101",
            ),
            (
                "a signed length",
                b"HTTP/1.1 200 OK\r\ncontent-length: +1\r\n\r\nx".to_vec(),
                "invalid content-length",
            ),
            (
                "only an informational answer",
                b"HTTP/1.1 100 Continue\r\n\r\n".to_vec(),
                "before an answer",
            ),
            ("head too long", long_head.into_bytes(), "head over"),
        ];
        for (what, bytes, says) in cases {
            let (mut conn, mut node) = pair().await;
            let (got, ()) = tokio::join!(conn.send(&head, LIMIT), async {
                read_request(&mut node, 0).await;
                node.write_all(&bytes).await.unwrap();
                drop(node);
            });
            match got {
                Err(Failed::Lost(reason)) => {
                    assert!(reason.contains(says), "{what}: {reason}");
                }
                other => panic!("{what}: {other:?}"),
            }
            assert!(!conn.may_keep(), "{what}");
        }
    }
}
