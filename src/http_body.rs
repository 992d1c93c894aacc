//! Reading an HTTP answer's body up to a limit, chunk by chunk: a larger body is an error
//! as soon as it shows, never a buffer of its size.

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the answer exceeds the limit of {limit} bytes")]
    TooLarge { limit: usize },
    #[error("unreadable answer")]
    Read(#[source] reqwest::Error),
}

/// The body of `response`, at most `limit` bytes of it.
pub async fn read_capped(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, BodyError> {
    if response
        .content_length()
        .is_some_and(|length| length > limit as u64)
    {
        return Err(BodyError::TooLarge { limit });
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| BodyError::Read(e.without_url()))?
    {
        if body.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
