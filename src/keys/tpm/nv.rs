//! NV indices: defined for objects kept on behalf of VNFs, erased on termination.

use tss_esapi::attributes::NvIndexAttributesBuilder;
use tss_esapi::constants::NvIndexType;
use tss_esapi::handles::{NvIndexHandle, NvIndexTpmHandle, ObjectHandle};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::resource_handles::{NvAuth, Provision};
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{MaxNvBuffer, NvPublicBuilder};

use super::connection::{not_found_or, tpm_error, Connection};
use crate::keys::{KeyError, TpmHandle};

/// Largest NV index this backend defines (TPM 2.0 Part 2 requires at least 2048 bytes of
/// MAX_NV_INDEX_SIZE; swtpm has 2048).
pub(super) const NV_MAX_SIZE: usize = 2048;
/// Bytes per TPM2_NV_Write (below every TPM's MAX_NV_BUFFER_SIZE, which is at least 512).
const NV_WRITE_CHUNK: usize = 512;

pub(super) fn nv_define(c: &mut Connection, index: TpmHandle, data: &[u8]) -> Result<(), KeyError> {
    let nv_index = NvIndexTpmHandle::new(index.0).map_err(tpm_error("TPM2_NV_DefineSpace"))?;
    let attributes = NvIndexAttributesBuilder::new()
        .with_nv_index_type(NvIndexType::Ordinary)
        .with_owner_write(true)
        .with_owner_read(true)
        .with_auth_write(true)
        .with_auth_read(true)
        .with_no_da(true)
        .build()
        .map_err(tpm_error("TPM2_NV_DefineSpace"))?;
    let public = NvPublicBuilder::new()
        .with_nv_index(nv_index)
        .with_index_name_algorithm(HashingAlgorithm::Sha256)
        .with_index_attributes(attributes)
        .with_data_area_size(data.len())
        .build()
        .map_err(tpm_error("TPM2_NV_DefineSpace"))?;
    let object = c
        .tpm()?
        .execute_with_session(Some(AuthSession::Password), |ctx| {
            ctx.nv_define_space(Provision::Owner, None, public)
        })
        .map_err(tpm_error("TPM2_NV_DefineSpace"))?;
    let mut written = Ok(());
    for (number, chunk) in data.chunks(NV_WRITE_CHUNK).enumerate() {
        let offset = u16::try_from(number * NV_WRITE_CHUNK)
            .map_err(|_| KeyError::InvalidArgument("NV data larger than 64 KiB".to_string()))?;
        let buffer = MaxNvBuffer::try_from(chunk.to_vec()).map_err(tpm_error("TPM2_NV_Write"))?;
        written = c
            .tpm()?
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.nv_write(NvAuth::Owner, object, buffer, offset)
            })
            .map_err(tpm_error("TPM2_NV_Write"));
        if written.is_err() {
            break;
        }
    }
    if let Err(e) = written {
        // Do not leave a half-written index behind.
        let undefined = c
            .tpm()?
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.nv_undefine_space(Provision::Owner, object)
            });
        if undefined.is_err() {
            let mut handle = ObjectHandle::from(object);
            let _ = c.tpm()?.tr_close(&mut handle);
        }
        return Err(e);
    }
    let mut handle = ObjectHandle::from(object);
    let _ = c.tpm()?.tr_close(&mut handle);
    Ok(())
}

pub(super) fn destroy_nv_index(
    c: &mut Connection,
    handle: TpmHandle,
) -> Result<(&'static str, bool), KeyError> {
    if !c.handles_in(handle.0, handle.0)?.contains(&handle.0) {
        return Err(KeyError::NotFound(handle.to_string()));
    }
    let object = c.open(handle)?;
    let undefined = c.tpm().and_then(|ctx| {
        ctx.execute_with_session(Some(AuthSession::Password), |ctx| {
            ctx.nv_undefine_space(Provision::Owner, NvIndexHandle::from(object))
        })
        .map_err(|e| not_found_or(handle, e, "TPM2_NV_UndefineSpace"))
    });
    // On success libtss2-esys has closed the NV object itself; otherwise it is still open.
    if let Err(e) = undefined {
        c.close(object);
        return Err(e);
    }
    let verified = !c.handles_in(handle.0, handle.0)?.contains(&handle.0);
    Ok(("NV index", verified))
}
