//! The create-VM form: text fields, focus, and validation into a
//! [`CreateVmRequest`].

use banger_api::CreateVmRequest;
use banger_config::{MAX_VCPU, MIN_MEMORY_MIB};
use banger_model::{ByteSize, VmName};

/// The fields of the form, in focus order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Name,
    Image,
    Vcpu,
    Memory,
    Disk,
}

impl Field {
    pub const ALL: [Field; 5] = [
        Field::Name,
        Field::Image,
        Field::Vcpu,
        Field::Memory,
        Field::Disk,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Field::Name => "name",
            Field::Image => "image",
            Field::Vcpu => "vcpu",
            Field::Memory => "memory",
            Field::Disk => "disk",
        }
    }

    /// What an empty field means.
    pub fn hint(self) -> &'static str {
        match self {
            Field::Name => "generated when empty",
            Field::Image => "default image when empty",
            Field::Vcpu => "vm_defaults when empty",
            Field::Memory => "MiB, or 2G; vm_defaults when empty",
            Field::Disk => "e.g. 16G; vm_defaults when empty",
        }
    }

    fn index(self) -> usize {
        Field::ALL.iter().position(|f| *f == self).unwrap_or(0)
    }
}

/// A field that does not hold a valid value, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: Field,
    pub message: String,
}

/// The state of the create form.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateForm {
    values: [String; 5],
    focus: usize,
    /// The error of the last submit attempt, shown under its field.
    pub error: Option<FieldError>,
}

impl CreateForm {
    pub fn focus(&self) -> Field {
        Field::ALL[self.focus]
    }

    pub fn value(&self, f: Field) -> &str {
        &self.values[f.index()]
    }

    pub fn set(&mut self, f: Field, value: &str) {
        self.values[f.index()] = value.to_string();
    }

    pub fn next(&mut self) {
        self.focus = (self.focus + 1) % Field::ALL.len();
    }

    pub fn prev(&mut self) {
        self.focus = (self.focus + Field::ALL.len() - 1) % Field::ALL.len();
    }

    pub fn push(&mut self, c: char) {
        // Control characters would garble the terminal and no field needs them.
        if !c.is_control() {
            self.values[self.focus].push(c);
        }
    }

    pub fn backspace(&mut self) {
        self.values[self.focus].pop();
    }

    /// The request the form describes, or the first invalid field. Empty
    /// fields are left to the daemon's defaults.
    pub fn validate(&self) -> Result<CreateVmRequest, FieldError> {
        let err = |field, message: String| FieldError { field, message };
        let opt = |f: Field| {
            let v = self.value(f).trim();
            (!v.is_empty()).then_some(v)
        };
        let name = opt(Field::Name)
            .map(|n| VmName::parse(n).map_err(|e| err(Field::Name, e.to_string())))
            .transpose()?;
        let image = opt(Field::Image)
            .map(|i| {
                if i.chars().any(char::is_whitespace) {
                    Err(err(Field::Image, format!("image name {i:?} has spaces")))
                } else {
                    Ok(i.to_string())
                }
            })
            .transpose()?;
        let vcpu = opt(Field::Vcpu)
            .map(|v| match v.parse::<u32>() {
                Ok(n) if (1..=MAX_VCPU).contains(&n) => Ok(n),
                _ => Err(err(
                    Field::Vcpu,
                    format!("vcpu must be a number from 1 to {MAX_VCPU}"),
                )),
            })
            .transpose()?;
        let memory_mib = opt(Field::Memory)
            .map(|m| match parse_memory_mib(m) {
                Some(n) if n >= MIN_MEMORY_MIB => Ok(n),
                Some(_) => Err(err(
                    Field::Memory,
                    format!("memory must be at least {MIN_MEMORY_MIB} MiB"),
                )),
                None => Err(err(
                    Field::Memory,
                    format!("{m:?} is not a memory size: use MiB (2048) or a unit (2G)"),
                )),
            })
            .transpose()?;
        let disk_size = opt(Field::Disk)
            .map(|d| match d.parse::<ByteSize>() {
                Ok(b) if b.bytes() > 0 && d.chars().any(|c| c.is_ascii_alphabetic()) => {
                    Ok(b.to_string())
                }
                _ => Err(err(
                    Field::Disk,
                    format!("{d:?} is not a disk size: use a unit, e.g. 16G"),
                )),
            })
            .transpose()?;
        Ok(CreateVmRequest {
            name: name.map(String::from),
            image,
            vcpu,
            memory_mib,
            disk_size,
            start: true,
            nat: false,
            ..Default::default()
        })
    }
}

/// Memory in MiB: a plain number is MiB, a size with a unit is converted
/// (rounded down).
fn parse_memory_mib(s: &str) -> Option<u64> {
    if let Ok(n) = s.parse::<u64>() {
        return Some(n);
    }
    s.parse::<ByteSize>().ok().map(ByteSize::as_mib)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(values: &[(Field, &str)]) -> CreateForm {
        let mut f = CreateForm::default();
        for (field, v) in values {
            f.set(*field, v);
        }
        f
    }

    #[test]
    fn empty_form_leaves_everything_to_the_daemon() {
        let req = CreateForm::default().validate().expect("valid");
        assert_eq!(req.name, None);
        assert_eq!(req.image, None);
        assert_eq!(req.vcpu, None);
        assert_eq!(req.memory_mib, None);
        assert_eq!(req.disk_size, None);
        assert!(req.start);
    }

    #[test]
    fn full_form_becomes_a_request() {
        let req = form(&[
            (Field::Name, " calm-otter "),
            (Field::Image, "debian-bookworm"),
            (Field::Vcpu, "2"),
            (Field::Memory, "2G"),
            (Field::Disk, "16G"),
        ])
        .validate()
        .expect("valid");
        assert_eq!(req.name.as_deref(), Some("calm-otter"));
        assert_eq!(req.image.as_deref(), Some("debian-bookworm"));
        assert_eq!(req.vcpu, Some(2));
        assert_eq!(req.memory_mib, Some(2048));
        assert_eq!(req.disk_size.as_deref(), Some("16G"));
    }

    #[test]
    fn plain_memory_is_mib() {
        let req = form(&[(Field::Memory, "1536")]).validate().expect("valid");
        assert_eq!(req.memory_mib, Some(1536));
    }

    #[test]
    fn each_bad_field_is_named() {
        for (field, value) in [
            (Field::Name, "Not_A_Label"),
            (Field::Image, "two words"),
            (Field::Vcpu, "0"),
            (Field::Vcpu, "65"),
            (Field::Vcpu, "many"),
            (Field::Memory, "64"),
            (Field::Memory, "lots"),
            (Field::Disk, "16"),
            (Field::Disk, "big"),
        ] {
            let e = form(&[(field, value)]).validate().expect_err(value);
            assert_eq!(e.field, field, "{value}: {}", e.message);
            assert!(!e.message.is_empty());
        }
    }

    #[test]
    fn focus_wraps_both_ways_and_typing_goes_to_the_focused_field() {
        let mut f = CreateForm::default();
        assert_eq!(f.focus(), Field::Name);
        f.prev();
        assert_eq!(f.focus(), Field::Disk);
        f.next();
        f.next();
        assert_eq!(f.focus(), Field::Image);
        for c in "deb\u{7}ian".chars() {
            f.push(c);
        }
        f.backspace();
        assert_eq!(f.value(Field::Image), "debia");
        assert_eq!(f.value(Field::Name), "");
    }
}
