//! The rules the daemon applies to what clients send, as constants, checks
//! and OpenAPI schemas made from the same constants, so the document states
//! exactly what the daemon accepts.
//!
//! Every string rule is an ECMA-262 / Python / Rust-compatible regular
//! expression plus length bounds; the daemon checks with [`StringRule::check`]
//! and the document carries [`StringRule::schema`].

use regex::Regex;
use std::sync::LazyLock;
use utoipa::openapi::schema::{ObjectBuilder, SchemaType, Type};
use utoipa::openapi::{Object, RefOr, Schema};

pub use banger_model::limits::{
    MAX_DISK_BYTES, MAX_MEMORY_MIB, MAX_VCPU, MIN_DISK_BYTES, MIN_MEMORY_MIB,
};
/// Signals `POST /v1/vms/{vm}/kill` sends: the standard ones, 1 (HUP) to 31 (SYS).
pub const MIN_SIGNAL: i32 = 1;
pub const MAX_SIGNAL: i32 = 31;
/// Most lines `GET /v1/vms/{vm}/logs?tail=` asks for.
pub const MAX_LOG_TAIL: u64 = 10_000_000;
/// Latest `since_ms` of `GET /v1/vms/{vm}/logs` (the document's integers
/// are int64).
pub const MAX_SINCE_MS: u64 = i64::MAX as u64;

/// A rule for a string field.
pub struct StringRule {
    /// What the value is, for messages ("VM name").
    pub what: &'static str,
    /// Anchored regular expression the whole value must match.
    pub regex: &'static LazyLock<Regex>,
    pub min_len: usize,
    pub max_len: Option<usize>,
    /// What a valid value looks like, for people.
    pub hint: &'static str,
}

/// Compiles one of this module's constant patterns (tested to compile).
fn compile(pattern: &str) -> Regex {
    Regex::new(pattern).expect("the rules' patterns are tested to compile")
}

static VM_NAME_PATTERN: LazyLock<Regex> = LazyLock::new(|| compile(banger_model::VM_NAME_PATTERN));
static IMAGE_NAME_PATTERN: LazyLock<Regex> = LazyLock::new(|| compile("^[a-z0-9][a-z0-9._-]*$"));
static SESSION_NAME_PATTERN: LazyLock<Regex> =
    LazyLock::new(|| compile("^[A-Za-z0-9_-][A-Za-z0-9._-]*$"));
static ABSOLUTE_PATH_PATTERN: LazyLock<Regex> = LazyLock::new(|| compile("^/"));
static REFERENCE_PATTERN: LazyLock<Regex> = LazyLock::new(|| compile("^[^\\s]+$"));
static URL_PATTERN: LazyLock<Regex> = LazyLock::new(|| compile("^(https?|file)://[^\\s]*$"));
static DISK_SIZE_PATTERN: LazyLock<Regex> =
    LazyLock::new(|| compile(&size_pattern(MIN_DISK_BYTES, MAX_DISK_BYTES)));

/// VM names: DNS labels, so `<name>.vm` resolves.
pub static VM_NAME: StringRule = StringRule {
    what: "VM name",
    regex: &VM_NAME_PATTERN,
    min_len: 1,
    max_len: Some(banger_model::VM_NAME_MAX_LEN),
    hint: "lowercase letters, digits and '-', not starting or ending with '-'",
};

/// Image and kernel names: they become directory and catalog names.
pub static IMAGE_NAME: StringRule = StringRule {
    what: "image name",
    regex: &IMAGE_NAME_PATTERN,
    min_len: 1,
    max_len: Some(63),
    hint: "a-z, 0-9, '.', '_' and '-', starting with a letter or digit",
};

/// Kernel names: the image name rule.
pub static KERNEL_NAME: StringRule = StringRule {
    what: "kernel name",
    ..IMAGE_NAME
};

/// Session names: they become file names on the host.
pub static SESSION_NAME: StringRule = StringRule {
    what: "session name",
    regex: &SESSION_NAME_PATTERN,
    min_len: 1,
    max_len: Some(banger_agent_proto::MAX_SESSION_NAME),
    hint: "letters, digits, '.', '_' or '-', not starting with '.'",
};

/// Host paths the daemon reads or writes.
pub static HOST_PATH: StringRule = StringRule {
    what: "path",
    regex: &ABSOLUTE_PATH_PATTERN,
    min_len: 1,
    max_len: Some(4096),
    hint: "an absolute path",
};

/// A catalog name or an OCI reference.
pub static REFERENCE: StringRule = StringRule {
    what: "reference",
    regex: &REFERENCE_PATTERN,
    min_len: 1,
    max_len: Some(1024),
    hint: "a catalog name or an OCI reference (registry/repo:tag), without spaces",
};

/// Where a bundle is published.
pub static BASE_URL: StringRule = StringRule {
    what: "base URL",
    regex: &URL_PATTERN,
    min_len: 1,
    max_len: Some(2048),
    hint: "an http://, https:// or file:// URL",
};

/// Disk sizes: a whole number of K, M, G or T (powers of 1024) or plain
/// bytes, between [`MIN_DISK_BYTES`] and [`MAX_DISK_BYTES`]. This is what
/// [`banger_model::ByteSize`] prints.
pub static DISK_SIZE: StringRule = StringRule {
    what: "disk size",
    regex: &DISK_SIZE_PATTERN,
    min_len: 1,
    max_len: None,
    hint: "a whole number with a K, M, G or T suffix (powers of 1024) from 64M to 2T, e.g. 16G",
};

/// A value a [`StringRule`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value:?} is not valid: use {hint}{len}")]
pub struct RuleError {
    pub what: &'static str,
    pub value: String,
    pub hint: &'static str,
    len: String,
}

impl StringRule {
    /// The rule's regular expression.
    pub fn pattern(&self) -> &'static str {
        self.regex.as_str()
    }

    /// Whether `value` follows the rule.
    pub fn matches(&self, value: &str) -> bool {
        let len = value.chars().count();
        len >= self.min_len && self.max_len.is_none_or(|m| len <= m) && self.regex.is_match(value)
    }

    /// Checks `value`, with a one-line error that says what is allowed.
    pub fn check(&self, value: &str) -> Result<(), RuleError> {
        if self.matches(value) {
            return Ok(());
        }
        Err(RuleError {
            what: self.what,
            value: value.to_string(),
            hint: self.hint,
            len: match self.max_len {
                Some(m) => format!(", {} to {m} characters", self.min_len),
                None => String::new(),
            },
        })
    }

    fn builder(&self, nullable: bool) -> ObjectBuilder {
        let ty = if nullable {
            SchemaType::from_iter([Type::String, Type::Null])
        } else {
            SchemaType::Type(Type::String)
        };
        ObjectBuilder::new()
            .schema_type(ty)
            .pattern(Some(self.pattern()))
            .min_length(Some(self.min_len))
            .max_length(self.max_len)
            .description(Some(format!("{}: {}", self.what, self.hint)))
    }

    /// The rule as a string schema.
    pub fn schema(&self) -> Object {
        self.builder(false).build()
    }

    /// The rule as a schema of a string or null (an optional field).
    pub fn nullable_schema(&self) -> Object {
        self.builder(true).build()
    }
}

/// An integer schema of `lo..=hi`, nullable or not.
fn integer_schema(
    lo: i64,
    hi: i64,
    nullable: bool,
    format: utoipa::openapi::KnownFormat,
) -> Object {
    let ty = if nullable {
        SchemaType::from_iter([Type::Integer, Type::Null])
    } else {
        SchemaType::Type(Type::Integer)
    };
    ObjectBuilder::new()
        .schema_type(ty)
        .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(format)))
        .minimum(Some(lo))
        .maximum(Some(hi))
        .build()
}

/// A session name as a path parameter's type:
/// `#[param(value_type = inline(rules::SessionNameParam))]`.
pub struct SessionNameParam;

impl utoipa::PartialSchema for SessionNameParam {
    fn schema() -> RefOr<Schema> {
        RefOr::T(Schema::Object(SESSION_NAME.schema()))
    }
}

impl utoipa::ToSchema for SessionNameParam {}

/// `tail` of `GET /v1/vms/{vm}/logs` as a query parameter's type.
pub struct LogTailParam;

impl utoipa::PartialSchema for LogTailParam {
    fn schema() -> RefOr<Schema> {
        RefOr::T(Schema::Object(integer_schema(
            0,
            MAX_LOG_TAIL as i64,
            false,
            utoipa::openapi::KnownFormat::Int64,
        )))
    }
}

impl utoipa::ToSchema for LogTailParam {}

/// `since_ms` of `GET /v1/vms/{vm}/logs` as a query parameter's type.
pub struct SinceMsParam;

impl utoipa::PartialSchema for SinceMsParam {
    fn schema() -> RefOr<Schema> {
        RefOr::T(Schema::Object(integer_schema(
            0,
            MAX_SINCE_MS as i64,
            false,
            utoipa::openapi::KnownFormat::Int64,
        )))
    }
}

impl utoipa::ToSchema for SinceMsParam {}

/// Schemas of the rules, for `#[schema(schema_with = ...)]`.
pub mod schema {
    use super::*;
    use utoipa::openapi::KnownFormat;

    pub fn vm_name_opt() -> Object {
        VM_NAME.nullable_schema()
    }
    pub fn image_name() -> Object {
        IMAGE_NAME.schema()
    }
    pub fn image_name_opt() -> Object {
        IMAGE_NAME.nullable_schema()
    }
    pub fn kernel_name() -> Object {
        KERNEL_NAME.schema()
    }
    pub fn kernel_name_opt() -> Object {
        KERNEL_NAME.nullable_schema()
    }
    pub fn session_name() -> Object {
        SESSION_NAME.schema()
    }
    pub fn host_path() -> Object {
        HOST_PATH.schema()
    }
    pub fn host_path_opt() -> Object {
        HOST_PATH.nullable_schema()
    }
    pub fn reference() -> Object {
        REFERENCE.schema()
    }
    pub fn base_url() -> Object {
        BASE_URL.schema()
    }
    pub fn disk_size_opt() -> Object {
        DISK_SIZE.nullable_schema()
    }
    /// `disk_size` of `PATCH /v1/vms/{vm}`: a string when present.
    pub fn disk_size() -> Object {
        DISK_SIZE.schema()
    }
    pub fn vcpu_opt() -> Object {
        integer_schema(1, i64::from(MAX_VCPU), true, KnownFormat::Int32)
    }
    pub fn vcpu() -> Object {
        integer_schema(1, i64::from(MAX_VCPU), false, KnownFormat::Int32)
    }
    pub fn memory_mib_opt() -> Object {
        integer_schema(
            MIN_MEMORY_MIB as i64,
            MAX_MEMORY_MIB as i64,
            true,
            KnownFormat::Int64,
        )
    }
    pub fn memory_mib() -> Object {
        integer_schema(
            MIN_MEMORY_MIB as i64,
            MAX_MEMORY_MIB as i64,
            false,
            KnownFormat::Int64,
        )
    }
    pub fn boolean() -> Object {
        ObjectBuilder::new().schema_type(Type::Boolean).build()
    }
    /// Rows or columns of a terminal.
    pub fn term_cells() -> Object {
        integer_schema(0, i64::from(u16::MAX), false, KnownFormat::Int32)
    }
    pub fn signal() -> Object {
        integer_schema(
            i64::from(MIN_SIGNAL),
            i64::from(MAX_SIGNAL),
            false,
            KnownFormat::Int32,
        )
    }
    /// A path parameter's schema.
    pub fn param(rule: &StringRule) -> RefOr<Schema> {
        RefOr::T(Schema::Object(rule.schema()))
    }
}

/// What the derive macros cannot say, added to the finished document:
/// `PATCH /v1/vms/{vm}` needs at least one field, and an image is
/// registered with exactly one of `kernel_ref` and `kernel`, `initrd`
/// only with `kernel`.
pub fn complete_document(doc: &mut serde_json::Value) {
    let schemas = &mut doc["components"]["schemas"];
    if let Some(set) = schemas.get_mut("SetVmRequest") {
        set["minProperties"] = 1.into();
    }
    if let Some(register) = schemas.get_mut("RegisterImageRequest") {
        register["oneOf"] = serde_json::json!([
            { "required": ["kernel_ref"], "not": { "required": ["initrd"] } },
            { "required": ["kernel"] }
        ]);
    }
}

/// An integer as JSON Schema counts them (`24` and `24.0` alike), within
/// `T`'s range: `#[serde(deserialize_with = "rules::integer")]`.
pub fn integer<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<i64> + TryFrom<u64>,
{
    use serde::de::Error;
    let n = <serde_json::Number as serde::Deserialize>::deserialize(d)?;
    let out_of_range = || D::Error::custom(format!("{n} is out of range"));
    if let Some(u) = n.as_u64() {
        return T::try_from(u).map_err(|_| out_of_range());
    }
    if let Some(i) = n.as_i64() {
        return T::try_from(i).map_err(|_| out_of_range());
    }
    match n.as_f64() {
        Some(f) if f.fract() == 0.0 && f >= i64::MIN as f64 && f <= u64::MAX as f64 => {
            if f >= 0.0 {
                T::try_from(f as u64).map_err(|_| out_of_range())
            } else {
                T::try_from(f as i64).map_err(|_| out_of_range())
            }
        }
        _ => Err(D::Error::custom(format!("{n} is not an integer"))),
    }
}

/// [`integer`] for an `Option` field that may be `null`.
pub fn integer_opt<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<i64> + TryFrom<u64>,
{
    match <Option<serde_json::Number> as serde::Deserialize>::deserialize(d)? {
        None => Ok(None),
        Some(n) => integer(n).map(Some).map_err(serde::de::Error::custom),
    }
}

/// [`integer`] for an `Option` field that may be absent but not `null`.
pub fn integer_present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<i64> + TryFrom<u64>,
{
    integer(d).map(Some)
}

/// For `Option` fields that may be absent but not `null`:
/// `#[serde(default, deserialize_with = "rules::present")]`.
pub fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// A regular expression matching exactly the decimal numbers (no leading
/// zeros) from `lo` to `hi`. Empty when `lo > hi`.
pub fn decimal_range(lo: u64, hi: u64) -> Vec<String> {
    let mut out = Vec::new();
    if lo > hi {
        return out;
    }
    let (lo_s, hi_s) = (lo.to_string(), hi.to_string());
    for digits in lo_s.len()..=hi_s.len() {
        let first = if digits == 1 {
            0
        } else {
            10u64.pow(digits as u32 - 1)
        };
        let last = 10u64.checked_pow(digits as u32).map_or(u64::MAX, |p| p - 1);
        let (a, b) = (lo.max(first), hi.min(last));
        if a <= b {
            out.extend(same_length(&a.to_string(), &b.to_string()));
        }
    }
    out
}

/// Alternatives matching the numbers from `a` to `b`, written with as many
/// digits each (a <= b).
fn same_length(a: &str, b: &str) -> Vec<String> {
    if a == b {
        return vec![a.to_string()];
    }
    let (a0, b0) = (a.as_bytes()[0] - b'0', b.as_bytes()[0] - b'0');
    let (ra, rb) = (&a[1..], &b[1..]);
    let n = ra.len();
    if n == 0 {
        return vec![class(a0, b0)];
    }
    if a0 == b0 {
        return vec![format!("{a0}{}", group(same_length(ra, rb)))];
    }
    let mut parts = Vec::new();
    let zeros = "0".repeat(n);
    let nines = "9".repeat(n);
    let mut from = a0;
    if ra != zeros {
        parts.push(format!("{a0}{}", group(same_length(ra, &nines))));
        from = a0 + 1;
    }
    let mut to = b0;
    let mut upper = None;
    if rb != nines {
        upper = Some(format!("{b0}{}", group(same_length(&zeros, rb))));
        to = b0 - 1;
    }
    if from <= to {
        parts.push(format!("{}[0-9]{{{n}}}", class(from, to)));
    }
    parts.extend(upper);
    parts
}

fn class(a: u8, b: u8) -> String {
    if a == b {
        a.to_string()
    } else {
        format!("[{a}-{b}]")
    }
}

fn group(alts: Vec<String>) -> String {
    if alts.len() == 1 {
        alts.into_iter().next().unwrap_or_default()
    } else {
        format!("(?:{})", alts.join("|"))
    }
}

/// A pattern for sizes from `min` to `max` bytes written as a whole number
/// with an optional K, M, G or T suffix.
pub fn size_pattern(min: u64, max: u64) -> String {
    let mut alts = Vec::new();
    for (unit, mult) in [
        ("", 1u64),
        ("K", 1 << 10),
        ("M", 1 << 20),
        ("G", 1 << 30),
        ("T", 1 << 40),
    ] {
        let range = decimal_range(min.div_ceil(mult), max / mult);
        if !range.is_empty() {
            alts.push(format!("{}{unit}", group_all(range)));
        }
    }
    format!("^(?:{})$", alts.join("|"))
}

fn group_all(alts: Vec<String>) -> String {
    format!("(?:{})", alts.join("|"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full(alts: Vec<String>) -> regex::Regex {
        regex::Regex::new(&format!("^(?:{})$", alts.join("|"))).expect("regex")
    }

    #[test]
    fn decimal_ranges_match_exactly_their_numbers() {
        for (lo, hi) in [
            (0, 9),
            (1, 31),
            (64, 999),
            (7, 1234),
            (128, 1 << 12),
            (100, 100),
            (19, 91),
        ] {
            let re = full(decimal_range(lo, hi));
            for n in 0..=(hi * 2 + 20) {
                assert_eq!(
                    re.is_match(&n.to_string()),
                    (lo..=hi).contains(&n),
                    "{n} in {lo}..={hi}: {re}"
                );
            }
            assert!(
                !re.is_match(&format!("0{lo}")),
                "leading zero accepted: {re}"
            );
        }
    }

    #[test]
    fn large_decimal_ranges_hold_their_bounds() {
        let (lo, hi) = (MIN_DISK_BYTES, MAX_DISK_BYTES);
        let re = full(decimal_range(lo, hi));
        for n in [lo, lo + 1, hi - 1, hi, 10 * lo, hi / 3] {
            assert!(re.is_match(&n.to_string()), "{n}");
        }
        for n in [0, lo - 1, hi + 1, hi * 10, u64::MAX] {
            assert!(!re.is_match(&n.to_string()), "{n}");
        }
    }

    #[test]
    fn disk_sizes_in_range_are_what_byte_size_prints() {
        for bytes in [
            MIN_DISK_BYTES,
            1 << 30,
            16 << 30,
            1536 << 20,
            MAX_DISK_BYTES,
            (1 << 30) + 1,
        ] {
            let printed = banger_model::ByteSize(bytes).to_string();
            assert!(DISK_SIZE.matches(&printed), "{printed}");
            assert_eq!(
                printed.parse::<banger_model::ByteSize>().map(|b| b.bytes()),
                Ok(bytes)
            );
        }
        for bad in [
            "63M", "0", "3T", "2049G", "16g", "16 G", "1.5G", "016G", "16GiB", "", "-1G",
        ] {
            assert!(!DISK_SIZE.matches(bad), "{bad}");
        }
    }

    #[test]
    fn vm_name_pattern_is_the_model_rule() {
        // Every string of up to 3 characters over an alphabet with one
        // member of each class, and a few long ones.
        let alphabet = ['a', 'z', '0', '-', 'A', '_', '.', ' ', 'é'];
        let mut all = vec![String::new()];
        for _ in 0..3 {
            let next: Vec<String> = all
                .iter()
                .flat_map(|s| alphabet.iter().map(move |c| format!("{s}{c}")))
                .collect();
            all.extend(next);
        }
        all.extend([
            "a".repeat(63),
            "a".repeat(64),
            format!("a{}b", "-".repeat(61)),
        ]);
        for s in &all {
            assert_eq!(
                VM_NAME.matches(s),
                banger_model::VmName::parse(s).is_ok(),
                "{s:?}"
            );
            assert_eq!(
                SESSION_NAME.matches(s),
                banger_agent_proto::validate_session_name(s).is_ok(),
                "{s:?}"
            );
        }
    }

    #[test]
    fn every_pattern_compiles() {
        for r in [
            &VM_NAME,
            &IMAGE_NAME,
            &KERNEL_NAME,
            &SESSION_NAME,
            &HOST_PATH,
            &REFERENCE,
            &BASE_URL,
            &DISK_SIZE,
        ] {
            regex::Regex::new(r.pattern()).unwrap_or_else(|e| panic!("{}: {e}", r.what));
        }
    }

    #[test]
    fn errors_say_what_is_allowed() {
        let e = IMAGE_NAME.check("Bad Name").expect_err("refused");
        assert_eq!(
            e.to_string(),
            "image name \"Bad Name\" is not valid: use a-z, 0-9, '.', '_' and '-', starting with a letter or digit, 1 to 63 characters"
        );
    }
}
