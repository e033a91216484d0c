//! Chat templates: the model's Jinja template rendered with `minijinja` as Hugging Face
//! `apply_chat_template` renders it (transformers' `ImmutableSandboxedEnvironment` with
//! `trim_blocks`, `lstrip_blocks` and loop controls, `raise_exception`, `strftime_now`, a
//! Python-compatible `tojson`, and Python string/dict/list methods).

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Kwargs, Serde, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

use super::SpecialTokens;
use crate::format::FormatError;

/// Largest template source accepted (1 MiB; real templates are at most tens of KiB).
pub const MAX_TEMPLATE_BYTES: usize = 1 << 20;
/// Fuel (minijinja instructions) one rendering may use: far beyond any real template over a
/// long conversation, small enough that a hostile template stops in well under a second.
const RENDER_FUEL: u64 = 50_000_000;
/// Longest rendered text (64 MiB).
const MAX_OUTPUT_BYTES: usize = 64 << 20;
/// Template name inside the environment.
const NAME: &str = "chat_template";

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `"system"`, `"user"`, `"assistant"` (or whatever roles the template knows).
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message with this role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

/// Why a template cannot be compiled or rendered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TemplateError {
    /// The template source is not valid Jinja (or is too large).
    #[error("invalid chat template: {reason}")]
    Syntax {
        /// The parser's message, with the line.
        reason: String,
    },
    /// The template called `raise_exception(message)`: the conversation is not one the model
    /// accepts (e.g. roles not alternating, a system message it does not support).
    #[error("the chat template rejected the conversation: {message}")]
    Raised {
        /// The template's message.
        message: String,
    },
    /// Rendering failed (an undefined method or filter, a type error, too much work).
    #[error("cannot render the chat template: {reason}")]
    Render {
        /// minijinja's message, with the line.
        reason: String,
    },
    /// The stored template is not a string or the special tokens are malformed.
    #[error(transparent)]
    Format(#[from] FormatError),
}

/// A compiled chat template. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Arc<Environment<'static>>,
    source: Arc<str>,
    special: Arc<SpecialTokens>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_bytes", &self.source.len())
            .field("bos", &self.special.bos)
            .field("eos", &self.special.eos)
            .finish()
    }
}

/// The error `raise_exception` returns; found again in the error's source chain.
#[derive(Debug)]
struct Raised(String);

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

/// `raise_exception(message)`: fails the rendering with the template's message.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, "raise_exception").with_source(Raised(message)))
}

/// One line: minijinja's message and, where known, the template line.
fn describe(e: &Error) -> String {
    let mut s = e.to_string();
    if let Some(line) = e.line() {
        if !s.contains("line") {
            let _ = write!(s, " (line {line})");
        }
    }
    s.lines().next().unwrap_or("").to_string()
}

impl ChatTemplate {
    /// The chat template stored in a model file (metadata key `chat_template`), with the
    /// file's special-token strings as `bos_token`, `eos_token`, `pad_token`, `unk_token`;
    /// `Ok(None)` when the file has none.
    pub fn from_model(model: &crate::ModelFile) -> Result<Option<ChatTemplate>, TemplateError> {
        Self::from_metadata(model.metadata())
    }

    /// [`from_model`](Self::from_model) from the metadata alone.
    pub fn from_metadata(meta: &crate::format::Metadata) -> Result<Option<ChatTemplate>, TemplateError> {
        let Some(source) = meta.chat_template()? else { return Ok(None) };
        let special = meta.special_tokens()?.unwrap_or_default();
        Self::with_special_tokens(source, &special).map(Some)
    }

    /// Compiles `source` with these values for `bos_token` and `eos_token`.
    pub fn new(
        source: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<ChatTemplate, TemplateError> {
        Self::with_special_tokens(source, &SpecialTokens { bos: bos_token, eos: eos_token, ..Default::default() })
    }

    /// Compiles `source`; `special` gives `bos_token`, `eos_token`, `pad_token` and
    /// `unk_token` (templates see the ones that are set, as in transformers).
    pub fn with_special_tokens(source: &str, special: &SpecialTokens) -> Result<ChatTemplate, TemplateError> {
        if source.len() > MAX_TEMPLATE_BYTES {
            return Err(TemplateError::Syntax {
                reason: format!("{} bytes, more than the {MAX_TEMPLATE_BYTES} allowed", source.len()),
            });
        }
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| TemplateError::Syntax { reason: describe(&e) })?;
        env.set_syntax(syntax);
        env.set_fuel(Some(RENDER_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.to_string()).map_err(|e| TemplateError::Syntax { reason: describe(&e) })?;
        Ok(ChatTemplate { env: Arc::new(env), source: Arc::from(source), special: Arc::new(special.clone()) })
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends with the opening of the
    /// assistant's turn. `strftime_now` formats the current UTC time.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, TemplateError> {
        self.render_at(messages, add_generation_prompt, SystemTime::now())
    }

    /// [`render`](Self::render) with `strftime_now` formatting `now` (UTC), for reproducible
    /// output.
    pub fn render_at(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        now: SystemTime,
    ) -> Result<String, TemplateError> {
        let secs = match now.duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
        };
        let strftime_now = Value::from_function(move |format: String| strftime(&format, secs));
        let tmpl = self.env.get_template(NAME).map_err(|e| TemplateError::Syntax { reason: describe(&e) })?;
        let s = &self.special;
        let mut pairs: Vec<(&str, Value)> = vec![
            ("messages", Value::from(Serde(messages))),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            ("tools", Value::from(())),
            ("documents", Value::from(())),
            ("strftime_now", strftime_now),
        ];
        // As transformers passes them: only the special tokens the tokenizer has, so a missing
        // one stays undefined (`is defined` tests) rather than `none`.
        for (name, token) in
            [("bos_token", &s.bos), ("eos_token", &s.eos), ("pad_token", &s.pad), ("unk_token", &s.unk)]
        {
            if let Some(t) = token {
                pairs.push((name, Value::from(t.clone())));
            }
        }
        let ctx = Value::from_pairs(pairs);
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| tmpl.render(ctx)))
            .map_err(|_| TemplateError::Render { reason: "the template engine failed on this template".to_string() })?;
        let out = out.map_err(|e| {
            let mut src: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(cur) = src {
                if let Some(r) = cur.downcast_ref::<Raised>() {
                    return TemplateError::Raised { message: r.0.clone() };
                }
                src = cur.source();
            }
            TemplateError::Render { reason: describe(&e) }
        })?;
        if out.len() > MAX_OUTPUT_BYTES {
            return Err(TemplateError::Render { reason: format!("the output is more than {MAX_OUTPUT_BYTES} bytes") });
        }
        Ok(out)
    }
}

/// `tojson` as transformers defines it: `json.dumps(value, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)` (Python's spacing and escaping, no HTML
/// escaping).
fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match indent {
        Some(v) => Some(v),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    let indent: Option<usize> = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(usize::try_from(v)?),
    };
    let sort_keys: bool = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let ensure_ascii: bool = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match separators {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(_) => return Err(Error::new(ErrorKind::InvalidOperation, "separators must be a pair of strings")),
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let opts = JsonOpts { indent, item_sep, key_sep, sort_keys, ensure_ascii };
    let mut out = String::new();
    write_json(&mut out, value, &opts, 0)?;
    Ok(Value::from_safe_string(out))
}

struct JsonOpts {
    indent: Option<usize>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

/// Deepest nesting `tojson` writes (Python raises RecursionError near 1000).
const MAX_JSON_DEPTH: usize = 512;

fn newline(out: &mut String, opts: &JsonOpts, depth: usize) {
    if let Some(n) = opts.indent {
        out.push('\n');
        for _ in 0..n * depth {
            out.push(' ');
        }
    }
}

fn write_json(out: &mut String, v: &Value, opts: &JsonOpts, depth: usize) -> Result<(), Error> {
    if depth > MAX_JSON_DEPTH {
        return Err(Error::new(ErrorKind::InvalidOperation, "tojson: value nested too deeply"));
    }
    if out.len() > MAX_OUTPUT_BYTES {
        return Err(Error::new(ErrorKind::InvalidOperation, "tojson: output too large"));
    }
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let Some(i) = v.as_i64() {
                let _ = write!(out, "{i}");
            } else if let Ok(f) = f64::try_from(v.clone()) {
                out.push_str(&python_float(f));
            } else {
                let _ = write!(out, "{v}");
            }
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline(out, opts, depth + 1);
                write_json(out, item, opts, depth + 1)?;
            }
            newline(out, opts, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if opts.sort_keys {
                keys.sort();
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline(out, opts, depth + 1);
                let key = match k.kind() {
                    ValueKind::String => k.to_string(),
                    ValueKind::None => "null".to_string(),
                    ValueKind::Bool => (if k.is_true() { "true" } else { "false" }).to_string(),
                    _ => k.to_string(),
                };
                write_json_str(out, &key, opts.ensure_ascii);
                out.push_str(&opts.key_sep);
                write_json(out, &v.get_item(k)?, opts, depth + 1)?;
            }
            newline(out, opts, depth);
            out.push('}');
        }
        // Strings, and what Python would print as one (`str(x)` of an object).
        _ => write_json_str(out, &v.to_string(), opts.ensure_ascii),
    }
    Ok(())
}

/// A JSON string as Python's `json.dumps` writes it.
fn write_json_str(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A float as Python's `repr` writes it (`1.0`, `0.1`, `1e+16`, `NaN`, `Infinity`).
fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".to_string();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.to_string();
    }
    // Shortest round-trip digits, then Python's choice between fixed and exponent notation:
    // exponent when the decimal exponent is < -4 or >= 16.
    let e = format!("{f:e}");
    let (mantissa, exp) = e.split_once('e').unwrap_or((&e, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..16).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", exp.abs());
    }
    let s = format!("{f}");
    if s.contains('.') {
        s
    } else {
        format!("{s}.0")
    }
}

const WEEKDAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// Civil date (year, month 1..=12, day 1..=31) of a day count since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// `strftime_now(format)`: Python's `datetime.now().strftime(format)` for the UTC time
/// `unix_seconds`. Supports `%a %A %b %B %d %-d %e %H %I %j %m %-m %M %p %S %y %Y %%`, `%F`,
/// `%T`, `%D`, `%Z` (`UTC`) and `%z` (`+0000`); other directives are kept as written.
pub(crate) fn strftime(format: &str, unix_seconds: i64) -> String {
    let days = unix_seconds.div_euclid(86_400);
    let secs = unix_seconds.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (secs / 3600, (secs / 60) % 60, secs % 60);
    let weekday = WEEKDAYS[(days + 3).rem_euclid(7) as usize]; // 1970-01-01 was a Thursday
    let month = MONTHS[(m - 1) as usize];
    let yday = {
        let jan1 = days_from_civil(y, 1, 1);
        days - jan1 + 1
    };
    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let no_pad = chars.peek() == Some(&'-');
        if no_pad {
            chars.next();
        }
        let Some(spec) = chars.next() else {
            out.push('%');
            break;
        };
        let num = |v: i64, width: usize| if no_pad { format!("{v}") } else { format!("{v:0width$}") };
        let piece = match spec {
            'a' => weekday[..3].to_string(),
            'A' => weekday.to_string(),
            'b' | 'h' => month[..3].to_string(),
            'B' => month.to_string(),
            'd' => num(i64::from(d), 2),
            'e' => format!("{d:>2}"),
            'H' => num(hh, 2),
            'I' => num(if hh % 12 == 0 { 12 } else { hh % 12 }, 2),
            'j' => num(yday, 3),
            'm' => num(i64::from(m), 2),
            'M' => num(mm, 2),
            'p' => (if hh < 12 { "AM" } else { "PM" }).to_string(),
            'S' => num(ss, 2),
            'y' => num(y.rem_euclid(100), 2),
            'Y' => format!("{y}"),
            'F' => format!("{y}-{m:02}-{d:02}"),
            'T' => format!("{hh:02}:{mm:02}:{ss:02}"),
            'D' => format!("{m:02}/{d:02}/{:02}", y.rem_euclid(100)),
            'Z' => "UTC".to_string(),
            'z' => "+0000".to_string(),
            '%' => "%".to_string(),
            other => {
                if no_pad {
                    format!("%-{other}")
                } else {
                    format!("%{other}")
                }
            }
        };
        out.push_str(&piece);
    }
    out
}

/// Days since 1970-01-01 of a civil date (inverse of [`civil_from_days`]).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_known_dates() {
        // 2024-07-26 00:00:00 UTC, a Friday.
        assert_eq!(strftime("%d %b %Y", 1_721_952_000), "26 Jul 2024");
        assert_eq!(strftime("%A %B %-d, %Y %H:%M:%S %j", 1_721_952_000 + 3661), "Friday July 26, 2024 01:01:01 208");
        assert_eq!(strftime("%F %T %p %I %y %%", 0), "1970-01-01 00:00:00 AM 12 70 %");
        assert_eq!(strftime("%Y-%m-%d", 951_782_400), "2000-02-29");
        assert_eq!(strftime("%Y-%m-%d %a", -86_400), "1969-12-31 Wed");
        assert_eq!(strftime("%Q %", 0), "%Q %");
        for days in [-1_000_000i64, -1, 0, 59, 10_957, 2_000_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    fn t(src: &str) -> ChatTemplate {
        ChatTemplate::new(src, Some("<s>".into()), Some("</s>".into())).unwrap()
    }

    #[test]
    fn hugging_face_template_features() {
        let msgs = vec![ChatMessage::new("user", " Hi <b> & 'x' ")];
        // tojson is Python's json.dumps: no HTML escaping, insertion order, Python spacing.
        assert_eq!(
            t("{{ messages[0] | tojson }}").render(&msgs, false).unwrap(),
            r#"{"role": "user", "content": " Hi <b> & 'x' "}"#
        );
        assert_eq!(
            t("{{ {'b': [1, 2.5, none, true], 'a': 'é\n'} | tojson(indent=2) }}").render(&[], false).unwrap(),
            "{\n  \"b\": [\n    1,\n    2.5,\n    null,\n    true\n  ],\n  \"a\": \"é\\n\"\n}"
        );
        assert_eq!(
            t("{{ {'b': 1, 'a': 2} | tojson(sort_keys=true) }}").render(&[], false).unwrap(),
            r#"{"a": 2, "b": 1}"#
        );
        // Python string and dict methods.
        assert_eq!(
            t("{{ messages[0].content.strip().upper() }}|{{ 'a,b'.split(',') | length }}|\
               {% if 'abc'.startswith('ab') %}yes{% endif %}|{% for k, v in {'x': 1}.items() %}{{ k }}={{ v }}{% endfor %}")
            .render(&msgs, false)
            .unwrap(),
            "HI <B> & 'X'|2|yes|x=1"
        );
        // Special tokens, the generation prompt, loop controls, trim_blocks/lstrip_blocks.
        let src = "{{ bos_token }}{% for m in messages %}\n  {% if loop.index > 1 %}{% break %}{% endif %}\n{{ m.role }}{% endfor %}\n{% if add_generation_prompt %}GEN{{ eos_token }}{% endif %}";
        let two = vec![ChatMessage::new("a", "1"), ChatMessage::new("b", "2")];
        assert_eq!(t(src).render(&two, true).unwrap(), "<s>aGEN</s>");
        assert_eq!(t(src).render(&two, false).unwrap(), "<s>a");
        // Undefined special tokens stay undefined.
        let only_eos =
            ChatTemplate::new("{% if bos_token is defined %}B{% endif %}{{ eos_token }}", None, Some("E".into()));
        assert_eq!(only_eos.unwrap().render(&[], false).unwrap(), "E");
        // strftime_now at a fixed instant.
        let at = UNIX_EPOCH + std::time::Duration::from_secs(1_741_964_966);
        assert_eq!(t("{{ strftime_now('%d %b %Y') }}").render_at(&[], false, at).unwrap(), "14 Mar 2025");
    }

    #[test]
    fn template_errors() {
        let msgs = vec![ChatMessage::new("system", "x")];
        let e = t("{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}")
            .render(&msgs, true)
            .unwrap_err();
        assert!(matches!(&e, TemplateError::Raised { message } if message == "System role not supported"), "{e:?}");
        assert_eq!(e.to_string(), "the chat template rejected the conversation: System role not supported");
        let e = ChatTemplate::new("{% if %}", None, None).unwrap_err();
        assert!(matches!(e, TemplateError::Syntax { .. }), "{e:?}");
        assert!(!e.to_string().contains('\n'));
        let e = t("{{ messages.nope() }}").render(&msgs, true).unwrap_err();
        assert!(matches!(e, TemplateError::Render { .. }), "{e:?}");
        // A hostile template runs out of fuel instead of running for minutes.
        let e = t("{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}")
            .render(&msgs, true)
            .unwrap_err();
        assert!(matches!(e, TemplateError::Render { .. }), "{e:?}");
        let huge = "x".repeat(MAX_TEMPLATE_BYTES + 1);
        assert!(matches!(ChatTemplate::new(&huge, None, None), Err(TemplateError::Syntax { .. })));
    }

    #[test]
    fn python_floats() {
        assert_eq!(python_float(1.0), "1.0");
        assert_eq!(python_float(0.1), "0.1");
        assert_eq!(python_float(1e16), "1e+16");
        assert_eq!(python_float(1.5e-5), "1.5e-05");
        assert_eq!(python_float(123456.75), "123456.75");
    }
}
