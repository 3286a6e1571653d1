//! Verification by probing (filled in below).
use crate::{NftError, Target};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct VerifyRow {}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub rows: Vec<VerifyRow>,
}

pub fn verify(_target: &Target) -> Result<VerifyReport, NftError> {
    Err(NftError::Decode("not yet".into()))
}
