//! The backend both tunnel benches dial: one small protocol so every path
//! (direct, our tunnel, ssh -R, rathole) carries the same payloads.
//! First byte: 'S' + u64 length: send that many bytes; 'U' + u64 length:
//! read that many bytes, then answer one byte; 'E': echo; 'R': read 1 KiB,
//! answer 1 KiB, close.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

pub async fn backend(listener: TcpListener) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let mut cmd = [0u8; 1];
            if s.read_exact(&mut cmd).await.is_err() {
                return;
            }
            match cmd[0] {
                b'S' => {
                    let mut len = [0u8; 8];
                    if s.read_exact(&mut len).await.is_err() {
                        return;
                    }
                    let mut left = u64::from_le_bytes(len);
                    let buf = vec![7u8; 256 * 1024];
                    while left > 0 {
                        let n = left.min(buf.len() as u64) as usize;
                        if s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                        left -= n as u64;
                    }
                    let _ = s.shutdown().await;
                }
                b'U' => {
                    let mut len = [0u8; 8];
                    if s.read_exact(&mut len).await.is_err() {
                        return;
                    }
                    let mut left = u64::from_le_bytes(len);
                    let mut buf = vec![0u8; 256 * 1024];
                    while left > 0 {
                        let n = left.min(buf.len() as u64) as usize;
                        match s.read(&mut buf[..n]).await {
                            Ok(0) | Err(_) => return,
                            Ok(got) => left -= got as u64,
                        }
                    }
                    let _ = s.write_all(b"k").await;
                    let _ = s.shutdown().await;
                }
                b'E' => {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                }
                b'R' => {
                    let mut req = [0u8; 1024];
                    if s.read_exact(&mut req).await.is_ok() {
                        let _ = s.write_all(&req).await;
                    }
                    let _ = s.shutdown().await;
                }
                _ => {}
            }
        });
    }
}
