//! `tojson` as Hugging Face chat templates see it: Python's
//! `json.dumps(x, ensure_ascii=False, indent=indent)`. Jinja's own `tojson`
//! (and minijinja's) HTML-escapes `<`, `>`, `&` and `'`, which would change the
//! rendered prompt and therefore the tokens and block keys.

use std::fmt::Write;

use serde_json::Value;

/// Python `json.dumps(v, ensure_ascii=False, indent=indent)`.
pub fn dumps(v: &Value, indent: Option<usize>) -> String {
    let mut out = String::new();
    write_value(&mut out, v, indent, 0);
    out
}

fn write_value(out: &mut String, v: &Value, indent: Option<usize>, depth: usize) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                    if indent.is_none() {
                        out.push(' ');
                    }
                }
                newline(out, indent, depth + 1);
                write_value(out, item, indent, depth + 1);
            }
            newline(out, indent, depth);
            out.push(']');
        }
        Value::Object(map) => {
            if map.is_empty() {
                out.push_str("{}");
                return;
            }
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                    if indent.is_none() {
                        out.push(' ');
                    }
                }
                newline(out, indent, depth + 1);
                write_string(out, k);
                out.push_str(": ");
                write_value(out, item, indent, depth + 1);
            }
            newline(out, indent, depth);
            out.push('}');
        }
    }
}

fn newline(out: &mut String, indent: Option<usize>, depth: usize) {
    if let Some(n) = indent {
        out.push('\n');
        out.extend(std::iter::repeat_n(' ', n * depth));
    }
}

fn write_number(out: &mut String, n: &serde_json::Number) {
    if let Some(f) = n.as_f64().filter(|_| n.is_f64()) {
        out.push_str(&python_float_repr(f));
    } else {
        let _ = write!(out, "{n}");
    }
}

/// Python's `repr(float)`: shortest round-trip digits, exponent form below 1e-4
/// or from 1e16, always with a fractional part or exponent.
fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    let abs = f.abs();
    if abs != 0.0 && !(1e-4..1e16).contains(&abs) {
        // Rust's `{:e}` is shortest round-trip too; Python pads the exponent to 2 digits.
        let s = format!("{f:e}");
        let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
        let (sign, digits) = match exp.strip_prefix('-') {
            Some(d) => ("-", d),
            None => ("+", exp),
        };
        return format!("{mantissa}e{sign}{digits:0>2}");
    }
    let s = format!("{f}");
    if s.contains('.') {
        s
    } else {
        format!("{s}.0")
    }
}

fn write_string(out: &mut String, s: &str) {
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
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn matches_python_json_dumps() {
        // Expected strings are what CPython 3.11's json.dumps(..., ensure_ascii=False) prints.
        let v = json!({"name": "get_weather", "args": {"city": "Zürich <b>", "n": [1, 2.5, 1e-05, 1e20, true, null]}, "e": {}, "l": []});
        assert_eq!(
            dumps(&v, None),
            r#"{"name": "get_weather", "args": {"city": "Zürich <b>", "n": [1, 2.5, 1e-05, 1e+20, true, null]}, "e": {}, "l": []}"#
        );
        assert_eq!(
            dumps(&json!({"a": [1, {"b": "x\n\"y\"\u{1}"}]}), Some(2)),
            "{\n  \"a\": [\n    1,\n    {\n      \"b\": \"x\\n\\\"y\\\"\\u0001\"\n    }\n  ]\n}"
        );
        assert_eq!(python_float_repr(3.0), "3.0");
        assert_eq!(python_float_repr(0.1), "0.1");
        assert_eq!(python_float_repr(-0.0001), "-0.0001");
        assert_eq!(python_float_repr(1e16), "1e+16");
    }
}
