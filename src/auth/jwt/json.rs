//! The strict JSON reading of a token's header and payload: one pass, no tree.
//!
//! Building a `serde_json::Value` allocates every key and string of a token only for the checks
//! to read a handful of members. Here the members the checks need are read into [`Member`]s,
//! which borrow from the decoded segment wherever a string holds no escape, and every other
//! value is walked and dropped. The one rule beyond JSON, that no object may hold the same key
//! twice at any depth (parsers disagree on which copy wins), holds for every object, kept or
//! not: the keys of the objects being read sit on one stack of [`Key`]s, so a segment's keys
//! cost one allocation. Keys are compared after unescaping, so `"\u0069ss"` is `iss`.
//!
//! The input goes through serde_json's own reader with `deserialize_any` for every value, so
//! exactly the same texts are refused (bad UTF-8 or escapes inside ignored strings, numbers out
//! of range, nesting deeper than 128) with the same errors, and a duplicate key is reported at
//! the same position as a `Value`-building reader would report it.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// A member's value as the checks look at it.
#[derive(Debug)]
pub(super) enum Member<'de> {
    /// A string.
    Str(Cow<'de, str>),
    /// An array holding only strings (or nothing).
    Strings(Vec<Cow<'de, str>>),
    /// An integer that fits i64: never a float (`1.0`, `1e10`), never a larger integer.
    Int(i64),
    /// An object whose one and only member is `x5t#S256`, a string (RFC 8705 `cnf`).
    Thumbprint(Cow<'de, str>),
    /// Any other object.
    Object,
    /// Anything else: null, a boolean, a float, an integer beyond i64, an array holding
    /// something other than a string.
    Other,
}

/// A key of an object being read, with its member's value when that was kept
/// ([`Place::Key`]).
#[derive(Debug)]
pub(super) struct Key<'de> {
    pub(super) name: Cow<'de, str>,
    pub(super) value: Option<Member<'de>>,
}

/// Where the value of a top-level member goes.
pub(super) enum Place<'s, 'de> {
    /// Into this slot of the caller's.
    Slot(&'s mut Option<Member<'de>>),
    /// Into the member's [`Key`], for the caller to find by name.
    Key,
    /// Nowhere: it is checked, then dropped.
    Skip,
}

/// Chooses, for each top-level key, where its value goes.
pub(super) trait Members<'de> {
    fn place(&mut self, key: &str) -> Place<'_, 'de>;
}

/// Reads the JSON text `json`. `Ok(true)`: it is an object; its members were handed to
/// `members` and its keys appended to `keys`. `Ok(false)`: valid JSON, but not an object.
/// Errors are serde_json's: `is_data()` for a duplicate key, syntax errors otherwise.
pub(super) fn read_object<'de, M: Members<'de>>(
    json: &'de [u8],
    keys: &mut Vec<Key<'de>>,
    members: &mut M,
) -> Result<bool, serde_json::Error> {
    // Checked as UTF-8 once, with the standard library's fast check: serde_json then reads
    // its strings without checking each again. Text that is not UTF-8 is read as bytes, so
    // that serde_json refuses it with the error it always gave.
    match std::str::from_utf8(json) {
        Ok(text) => read_with(serde_json::Deserializer::from_str(text), keys, members),
        Err(_) => read_with(serde_json::Deserializer::from_slice(json), keys, members),
    }
}

/// What `serde_json::from_slice` does, with a seed instead of a `Deserialize` type.
fn read_with<'de, R, M>(
    mut de: serde_json::Deserializer<R>,
    keys: &mut Vec<Key<'de>>,
    members: &mut M,
) -> Result<bool, serde_json::Error>
where
    R: serde_json::de::Read<'de>,
    M: Members<'de>,
{
    let is_object = de.deserialize_any(TopLevel { keys, members })?;
    de.end()?;
    Ok(is_object)
}

struct TopLevel<'a, 'de, M> {
    keys: &'a mut Vec<Key<'de>>,
    members: &'a mut M,
}

impl<'de, M: Members<'de>> Visitor<'de> for TopLevel<'_, 'de, M> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<bool, A::Error> {
        skip_seq(seq, self.keys)?;
        Ok(false)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        let start = self.keys.len();
        while let Some(name) = next_new_key(&mut map, self.keys, start)? {
            let value = match self.members.place(&name) {
                Place::Slot(slot) => {
                    *slot = Some(map.next_value_seed(Read(&mut *self.keys))?);
                    None
                }
                Place::Key => Some(map.next_value_seed(Read(&mut *self.keys))?),
                Place::Skip => {
                    map.next_value_seed(Skip(&mut *self.keys))?;
                    None
                }
            };
            self.keys.push(Key { name, value });
        }
        Ok(true)
    }
}

/// The next key of an object whose keys so far are `keys[start..]`; an error if it repeats
/// one of them, raised before its value is read (where a `Value` reader raises it).
fn next_new_key<'de, A: MapAccess<'de>>(
    map: &mut A,
    keys: &[Key<'de>],
    start: usize,
) -> Result<Option<Cow<'de, str>>, A::Error> {
    let Some(name) = map.next_key_seed(KeyName)? else {
        return Ok(None);
    };
    if keys[start..].iter().any(|k| k.name == name) {
        return Err(de::Error::custom(format!("duplicate key {name:?}")));
    }
    Ok(Some(name))
}

/// Skips the rest of an array, refusing duplicate keys in the objects it holds.
fn skip_seq<'de, A: SeqAccess<'de>>(mut seq: A, keys: &mut Vec<Key<'de>>) -> Result<(), A::Error> {
    while seq.next_element_seed(Skip(&mut *keys))?.is_some() {}
    Ok(())
}

/// Skips the rest of an object, refusing duplicate keys in it and in the objects it holds.
fn skip_map<'de, A: MapAccess<'de>>(mut map: A, keys: &mut Vec<Key<'de>>) -> Result<(), A::Error> {
    let start = keys.len();
    while let Some(name) = next_new_key(&mut map, keys, start)? {
        map.next_value_seed(Skip(&mut *keys))?;
        keys.push(Key { name, value: None });
    }
    keys.truncate(start);
    Ok(())
}

/// An object key, borrowed unless it holds an escape.
struct KeyName;

impl<'de> DeserializeSeed<'de> for KeyName {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyName {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v))
    }
}

/// Reads a value into a [`Member`]; the keys of the objects it holds go on the stack.
struct Read<'a, 'de>(&'a mut Vec<Key<'de>>);

impl<'de> DeserializeSeed<'de> for Read<'_, 'de> {
    type Value = Member<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Read<'_, 'de> {
    type Value = Member<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Member::Other)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Member::Int(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(i64::try_from(v).map_or(Member::Other, Member::Int))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        // serde_json reads any number with a fraction or an exponent, and any integer too
        // large for 64 bits, as f64.
        Ok(Member::Other)
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Member::Str(Cow::Borrowed(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Member::Str(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Member::Str(Cow::Owned(v)))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Member::Other)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(Text(&mut *self.0))? {
            match item {
                Some(text) => items.push(text),
                None => {
                    skip_seq(seq, self.0)?;
                    return Ok(Member::Other);
                }
            }
        }
        Ok(Member::Strings(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let start = self.0.len();
        let mut thumbprint = None;
        while let Some(name) = next_new_key(&mut map, self.0, start)? {
            if name == "x5t#S256" {
                thumbprint = map.next_value_seed(Text(&mut *self.0))?;
            } else {
                map.next_value_seed(Skip(&mut *self.0))?;
            }
            self.0.push(Key { name, value: None });
        }
        let count = self.0.len() - start;
        self.0.truncate(start);
        Ok(match thumbprint {
            Some(t) if count == 1 => Member::Thumbprint(t),
            _ => Member::Object,
        })
    }
}

/// Reads a string; any other value is skipped and gives `None`.
struct Text<'a, 'de>(&'a mut Vec<Key<'de>>);

impl<'de> DeserializeSeed<'de> for Text<'_, 'de> {
    type Value = Option<Cow<'de, str>>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Text<'_, 'de> {
    type Value = Option<Cow<'de, str>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Some(Cow::Borrowed(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Some(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Some(Cow::Owned(v)))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        skip_seq(seq, self.0)?;
        Ok(None)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        skip_map(map, self.0)?;
        Ok(None)
    }
}

/// Walks a value without keeping anything, refusing duplicate keys in the objects it holds.
struct Skip<'a, 'de>(&'a mut Vec<Key<'de>>);

impl<'de> DeserializeSeed<'de> for Skip<'_, 'de> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Skip<'_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        skip_seq(seq, self.0)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        skip_map(map, self.0)
    }
}

#[cfg(test)]
mod tests {
    use serde::de::Deserialize;
    use serde_json::{Map, Value};

    use super::*;

    /// The reader this module replaced: a whole `Value`, refusing duplicate keys at any depth.
    /// Kept as the reference that [`read_object`] must agree with.
    struct StrictValue(Value);

    impl<'de> Deserialize<'de> for StrictValue {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(StrictVisitor).map(StrictValue)
        }
    }

    struct StrictVisitor;

    impl<'de> Visitor<'de> for StrictVisitor {
        type Value = Value;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON value")
        }

        fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
            Ok(Value::Bool(v))
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
            Ok(Value::from(v))
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
            Ok(Value::from(v))
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
            Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
            Ok(Value::String(v.to_owned()))
        }

        fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
            Ok(Value::Null)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
            let mut items = Vec::new();
            while let Some(StrictValue(v)) = seq.next_element()? {
                items.push(v);
            }
            Ok(Value::Array(items))
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
            let mut object = Map::new();
            while let Some(key) = map.next_key::<String>()? {
                if object.contains_key(&key) {
                    return Err(de::Error::custom(format!("duplicate key {key:?}")));
                }
                let StrictValue(value) = map.next_value()?;
                object.insert(key, value);
            }
            Ok(Value::Object(object))
        }
    }

    /// Keeps every top-level member in its key.
    struct KeepAll;

    impl<'de> Members<'de> for KeepAll {
        fn place(&mut self, _: &str) -> Place<'_, 'de> {
            Place::Key
        }
    }

    /// Skips every top-level member.
    struct SkipAll;

    impl<'de> Members<'de> for SkipAll {
        fn place(&mut self, _: &str) -> Place<'_, 'de> {
            Place::Skip
        }
    }

    /// What the reference makes of `json`: an object's members, "not an object", or the error
    /// text and whether it is a data error.
    fn reference(json: &[u8]) -> Result<Option<Map<String, Value>>, (String, bool)> {
        match serde_json::from_slice::<StrictValue>(json) {
            Ok(StrictValue(Value::Object(map))) => Ok(Some(map)),
            Ok(_) => Ok(None),
            Err(e) => Err((e.to_string(), e.is_data())),
        }
    }

    /// The member type the checks would see for a `Value`.
    fn expected_member(v: &Value) -> String {
        match v {
            Value::String(s) => format!("Str({s:?})"),
            Value::Number(n) if n.is_i64() => format!("Int({})", n.as_i64().unwrap_or(0)),
            Value::Array(items) if items.iter().all(Value::is_string) => {
                let items: Vec<String> = items
                    .iter()
                    .map(|i| format!("{:?}", i.as_str().unwrap_or("")))
                    .collect();
                format!("Strings([{}])", items.join(", "))
            }
            Value::Object(o) if o.len() == 1 && o.get("x5t#S256").is_some_and(Value::is_string) => {
                format!("Thumbprint({:?})", o["x5t#S256"].as_str().unwrap_or(""))
            }
            Value::Object(_) => "Object".into(),
            _ => "Other".into(),
        }
    }

    fn shown(m: &Member<'_>) -> String {
        match m {
            Member::Str(s) => format!("Str({s:?})"),
            Member::Int(n) => format!("Int({n})"),
            Member::Strings(items) => {
                let items: Vec<String> = items.iter().map(|i| format!("{i:?}")).collect();
                format!("Strings([{}])", items.join(", "))
            }
            Member::Thumbprint(t) => format!("Thumbprint({t:?})"),
            Member::Object => "Object".into(),
            Member::Other => "Other".into(),
        }
    }

    const VALUES: &[&str] = &[
        r#""s""#,
        r#""a\u0000b""#,
        r#""\ud83d\ude00""#,
        r#""x\"y""#,
        r#""""#,
        "0",
        "-0",
        "1",
        "-1",
        "1.0",
        "1e10",
        "1E2",
        "9223372036854775807",
        "9223372036854775808",
        "-9223372036854775808",
        "-9223372036854775809",
        "18446744073709551615",
        "18446744073709551616",
        "99999999999999999999999",
        "null",
        "true",
        "false",
        "[]",
        r#"["a"]"#,
        r#"["a","b\u0063"]"#,
        r#"["a",1]"#,
        r#"[1,"a"]"#,
        r#"[["a"]]"#,
        r#"[{"a":1},{"a":1}]"#,
        "{}",
        r#"{"x5t#S256":"t"}"#,
        r#"{"x5t\u0023S256":"t"}"#,
        r#"{"x5t#S256":"t","a":1}"#,
        r#"{"a":1,"x5t#S256":"t"}"#,
        r#"{"x5t#S256":1}"#,
        r#"{"x5t#S256":["t"]}"#,
        r#"{"jkt":"t"}"#,
        r#"{"a":{"b":1},"b":{"a":1}}"#,
    ];

    #[test]
    fn members_have_the_json_types_of_their_values() {
        for value in VALUES {
            let json = format!(r#"{{"m": {value}}}"#);
            let mut keys = Vec::new();
            assert_eq!(
                read_object(json.as_bytes(), &mut keys, &mut KeepAll).ok(),
                Some(true)
            );
            let expected = match reference(json.as_bytes()) {
                Ok(Some(map)) => expected_member(&map["m"]),
                other => panic!("{value}: {other:?}"),
            };
            let member = keys[0].value.as_ref().map(shown);
            assert_eq!(member.as_deref(), Some(expected.as_str()), "{value}");
        }
    }

    #[test]
    fn strings_without_escapes_are_borrowed() {
        let json = br#"{"k": "plain", "e": "esc\u0061ped", "l": ["x", "y\n"]}"#;
        let mut keys = Vec::new();
        read_object(json, &mut keys, &mut KeepAll).unwrap();
        assert!(matches!(
            keys[0].value,
            Some(Member::Str(Cow::Borrowed("plain")))
        ));
        match &keys[1].value {
            Some(Member::Str(Cow::Owned(s))) => assert_eq!(s, "escaped"),
            other => panic!("{other:?}"),
        }
        match &keys[2].value {
            Some(Member::Strings(items)) => {
                assert!(matches!(items[0], Cow::Borrowed("x")));
                assert!(matches!(&items[1], Cow::Owned(s) if s == "y\n"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reads_like_a_strict_value_reader() {
        let mut texts: Vec<Vec<u8>> = Vec::new();
        for value in VALUES {
            texts.push(format!(r#"{{"a":1,"m":{value}}}"#).into_bytes());
            texts.push(format!(r#"{{"m":{value},"m":{value}}}"#).into_bytes());
            texts.push(value.as_bytes().to_vec());
            texts.push(format!("[{value},{value}]").into_bytes());
        }
        for text in [
            r#"{"a":1,"a":2}"#,
            r#"{"a":1,"\u0061":2}"#,
            r#"{"\u0069ss":1,"iss":2}"#,
            r#"{ "a" : 1 ,  "a"  : 2 }"#,
            r#"{"x":[{"a":1,"b":{"c":[{"d":1,"d":2}]}}]}"#,
            r#"{"x":{"a":1},"y":{"a":1},"a":{"x":1}}"#,
            r#"[{"a":1,"a":2}]"#,
            r#"[{"a":1,"a":2}] x"#,
            r#"{"a":1} x"#,
            r#"{"a":1}"#,
            "{",
            "}",
            "",
            " ",
            r#"{"a":}"#,
            r#"{"a":1,}"#,
            "[1,]",
            r#"{"a" 1}"#,
            "{1:1}",
            r#"{"a":"\x"}"#,
            r#"{"a":"\ud800"}"#,
            r#"{"a":"\ud800\u0041"}"#,
            r#"{"a":"unterminated}"#,
            r#"{"a":1e400}"#,
            r#"{"a":-1e400}"#,
            r#"{"a":01}"#,
            r#"{"a":+1}"#,
            r#"{"a":.5}"#,
            r#"{"a":1.}"#,
            r#"{"a":NaN}"#,
            r#"{"a":tru}"#,
            r#"{"":1,"":2}"#,
            r#"{"a":1,"a":"\x"}"#,
            "{\"a\":\"\u{1}\"}",
        ] {
            texts.push(text.as_bytes().to_vec());
        }
        texts.push(b"{\"a\":\"\xff\"}".to_vec());
        texts.push(b"{\"\xc3\":1}".to_vec());
        texts.push(format!("{}1{}", "[".repeat(127), "]".repeat(127)).into_bytes());
        texts.push(format!("{}1{}", "[".repeat(128), "]".repeat(128)).into_bytes());
        texts.push(format!("{}1{}", r#"{"a":"#.repeat(128), "}".repeat(128)).into_bytes());

        for text in &texts {
            let expected =
                reference(text).map(|m| m.map(|m| m.keys().cloned().collect::<Vec<_>>()));
            for keep in [true, false] {
                let mut keys = Vec::new();
                let read = if keep {
                    read_object(text, &mut keys, &mut KeepAll)
                } else {
                    read_object(text, &mut keys, &mut SkipAll)
                };
                let got = match read {
                    Ok(true) => {
                        let mut names: Vec<String> =
                            keys.iter().map(|k| k.name.to_string()).collect();
                        names.sort();
                        Ok(Some(names))
                    }
                    Ok(false) => Ok(None),
                    Err(e) => Err((e.to_string(), e.is_data())),
                };
                assert_eq!(got, expected, "{}", String::from_utf8_lossy(text));
            }
        }
    }

    #[test]
    fn only_the_top_level_keys_remain() {
        let json = br#"{"a":{"b":{"c":1}},"d":[{"e":1}],"f":1}"#;
        let mut keys = Vec::new();
        read_object(json, &mut keys, &mut SkipAll).unwrap();
        let names: Vec<&str> = keys.iter().map(|k| &*k.name).collect();
        assert_eq!(names, ["a", "d", "f"]);
    }
}
