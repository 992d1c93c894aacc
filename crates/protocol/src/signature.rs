//! Slack's request signing, version 0: `X-Slack-Signature: v0=<hex HMAC-SHA256>` over
//! `"v0:" + X-Slack-Request-Timestamp + ":" + body`, keyed with the app's signing secret.
//! flowcoach signs what it forwards with it; an app in HTTP mode (such as the demo app,
//! `flowcoach-dev app`) verifies it.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header carrying the signature.
pub const SIGNATURE_HEADER: &str = "x-slack-signature";
/// The header carrying the unix time (seconds) the signature covers.
pub const TIMESTAMP_HEADER: &str = "x-slack-request-timestamp";
/// Verifiers refuse requests whose timestamp is further than this from their clock, in
/// seconds (a replay guard): a request must be signed when it is sent, not when queued.
pub const MAX_CLOCK_SKEW_SECS: u64 = 5 * 60;

type HmacSha256 = Hmac<Sha256>;

/// Why a request's signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the signature is not of the form v0=<64 hex digits>")]
    Malformed,
    #[error("the timestamp is not a number of seconds")]
    BadTimestamp,
    #[error("the timestamp is {skew_secs}s from now, more than {MAX_CLOCK_SKEW_SECS}s")]
    Stale { skew_secs: u64 },
    #[error("the signature does not match the body")]
    Mismatch,
}

fn mac(secret: &[u8], timestamp: &str, body: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length.
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(b"v0:");
    mac.update(timestamp.as_bytes());
    mac.update(b":");
    mac.update(body);
    mac
}

/// The `X-Slack-Signature` value for `body` sent at `timestamp` (unix seconds).
pub fn sign(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let digest = mac(secret, &timestamp.to_string(), body)
        .finalize()
        .into_bytes();
    let mut value = String::with_capacity(3 + 2 * digest.len());
    value.push_str("v0=");
    for byte in digest {
        value.push(char::from(HEX[usize::from(byte >> 4)]));
        value.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
    value
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Checks a request as an app would: the timestamp within [`MAX_CLOCK_SKEW_SECS`] of `now`
/// (unix seconds), and the signature, compared in constant time.
pub fn verify(
    secret: &[u8],
    timestamp: &str,
    signature: &str,
    body: &[u8],
    now: u64,
) -> Result<(), SignatureError> {
    let sent: u64 = timestamp
        .trim()
        .parse()
        .map_err(|_| SignatureError::BadTimestamp)?;
    let skew_secs = now.abs_diff(sent);
    if skew_secs > MAX_CLOCK_SKEW_SECS {
        return Err(SignatureError::Stale { skew_secs });
    }
    let digest = signature
        .strip_prefix("v0=")
        .and_then(decode_hex)
        .ok_or(SignatureError::Malformed)?;
    mac(secret, timestamp.trim(), body)
        .verify_slice(&digest)
        .map_err(|_| SignatureError::Mismatch)
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() != 64 {
        return None;
    }
    let digit = |c: u8| char::from(c).to_digit(16);
    text.as_bytes()
        .chunks(2)
        .map(|pair| Some((digit(pair[0])? * 16 + digit(pair[1])?) as u8))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of Slack's "Verifying requests from Slack" page.
    const SECRET: &[u8] = b"8f742231b10e8888abcd99yyyzzz85a5";
    const TIMESTAMP: u64 = 1_531_420_618;
    const BODY: &[u8] = b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
    const EXPECTED: &str = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503";

    #[test]
    fn signs_as_slack_documents_it() {
        assert_eq!(sign(SECRET, TIMESTAMP, BODY), EXPECTED);
    }

    #[test]
    fn verifies_what_it_signed_and_refuses_tampering() {
        let ts = TIMESTAMP.to_string();
        assert_eq!(verify(SECRET, &ts, EXPECTED, BODY, TIMESTAMP + 10), Ok(()));
        let mut tampered = BODY.to_vec();
        tampered[0] ^= 1;
        assert_eq!(
            verify(SECRET, &ts, EXPECTED, &tampered, TIMESTAMP),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(b"other secret", &ts, EXPECTED, BODY, TIMESTAMP),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(SECRET, &ts, "v0=zz", BODY, TIMESTAMP),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            verify(SECRET, "soon", EXPECTED, BODY, TIMESTAMP),
            Err(SignatureError::BadTimestamp)
        );
        assert_eq!(
            verify(SECRET, &ts, EXPECTED, BODY, TIMESTAMP + 301),
            Err(SignatureError::Stale { skew_secs: 301 })
        );
    }
}
