//! The device's identity (manufacturer, vendor strings, firmware), and whether it is a
//! software TPM.

use tss_esapi::constants::PropertyTag;

use super::connection::{tpm_error, Connection};
use crate::keys::KeyError;

pub(super) struct DeviceIdentity {
    manufacturer: String,
    vendor: String,
    firmware: (u32, u32),
    pub software: bool,
}

impl DeviceIdentity {
    pub fn describe(&self) -> String {
        let (fw1, fw2) = self.firmware;
        format!(
            "TPM 2.0 manufacturer {} vendor \"{}\" firmware {}.{}.{}.{}{}",
            if self.manufacturer.is_empty() {
                "?"
            } else {
                &self.manufacturer
            },
            self.vendor,
            fw1 >> 16,
            fw1 & 0xffff,
            fw2 >> 16,
            fw2 & 0xffff,
            if self.software { " (software TPM)" } else { "" }
        )
    }
}

pub(super) fn device_identity(c: &mut Connection) -> Result<DeviceIdentity, KeyError> {
    let mut property = |tag| {
        c.tpm()?
            .get_tpm_property(tag)
            .map(|value| value.unwrap_or(0))
            .map_err(tpm_error("TPM2_GetCapability"))
    };
    let manufacturer = ascii(property(PropertyTag::Manufacturer)?);
    let mut vendor = String::new();
    for tag in [
        PropertyTag::VendorString1,
        PropertyTag::VendorString2,
        PropertyTag::VendorString3,
        PropertyTag::VendorString4,
    ] {
        vendor.push_str(&ascii_raw(property(tag)?));
    }
    let vendor = vendor.split_whitespace().collect::<Vec<_>>().join(" ");
    let firmware = (
        property(PropertyTag::FirmwareVersion1)?,
        property(PropertyTag::FirmwareVersion2)?,
    );
    let lower = vendor.to_ascii_lowercase();
    // swtpm/libtpms report manufacturer "IBM" and vendor "SW TPM".
    let software = manufacturer == "IBM"
        || vendor.split(' ').any(|word| word == "SW")
        || lower.contains("swtpm")
        || lower.contains("libtpms");
    Ok(DeviceIdentity {
        manufacturer,
        vendor,
        firmware,
        software,
    })
}

fn ascii(value: u32) -> String {
    ascii_raw(value).trim().to_string()
}

fn ascii_raw(value: u32) -> String {
    value
        .to_be_bytes()
        .iter()
        .map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                ' '
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manufacturer_ascii() {
        assert_eq!(ascii(0x4942_4d00), "IBM");
        assert_eq!(ascii_raw(0x5357_2020), "SW  ");
    }
}
