//! Request values read within a count, so that what a parsed body holds stays near its size.
//!
//! A JSON value takes a few bytes of a body and tens in memory once read: an empty string in
//! a list is 3 bytes of JSON and a 24-byte `String` (a chunk reference 72, a chat message
//! 48, and an allocator block for any text in it), a `0` in a `serde_json::Value` 32 bytes,
//! and a growing list doubles its capacity. The body budget counts a body's bytes, so a body
//! of many tiny values would hold 5–50× what it was admitted for while it is read. Three
//! rules keep that bounded:
//!
//! - a list the server limits anyway is read only up to the API's ceiling for it
//!   (`read_list`: chunks ([`crate::chunks::MAX_CHUNKS`]), stop strings; a second prompt
//!   in `openai/read.rs`), one element past it refusing the body;
//! - a chat request's messages and their content parts together are at most
//!   [`MAX_MESSAGE_ITEMS`] (`openai/read.rs`);
//! - a field read only to be checked and refused (`tools`, `response_format`, ...) is read
//!   as a [`Value`] of at most [`MAX_CHECKED_VALUES`] values each (`checked_value`).
//!
//! What is left unbounded by count is text (a long string takes in memory about what it
//! takes in the body) and token-id lists (`0,` is 2 bytes of JSON and a 4-byte `u32`).

use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Number, Value};

use crate::chunks::{ChunkRef, MAX_CHUNKS};

/// Most values one checked field (`tools`, `functions`, `tool_choice`, `function_call`,
/// `response_format`, `logit_bias`) may hold: a tool list with its schemas fits, a padded one
/// does not (4,096 values: a few hundred KiB read, lists' growth and map nodes included).
pub const MAX_CHECKED_VALUES: usize = 4096;

/// Most messages and content parts one chat request holds together (`limits.max_text_bytes`
/// counts 32 bytes of markup a message, so its default of 1 MiB serves 32,768 messages).
pub const MAX_MESSAGE_ITEMS: usize = 1 << 16;

/// Reads a list of at most `max` elements; `too_many` says what a longer one breaks (the
/// rest of the list is not read).
pub(crate) fn read_list<'de, A, T>(
    mut seq: A,
    max: usize,
    too_many: impl FnOnce() -> String,
) -> Result<Vec<T>, A::Error>
where
    A: SeqAccess<'de>,
    T: Deserialize<'de>,
{
    // the list's own length hint is not trusted for the reservation
    let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(max).min(1024));
    while let Some(x) = seq.next_element()? {
        if v.len() == max {
            return Err(de::Error::custom(too_many()));
        }
        v.push(x);
    }
    Ok(v)
}

/// A list of at most [`MAX_CHUNKS`] chunk references (read as `Option<ChunkList>` where
/// `null` is none).
pub(crate) struct ChunkList(pub(crate) Vec<ChunkRef>);

impl<'de> Deserialize<'de> for ChunkList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct List;
        impl<'de> Visitor<'de> for List {
            type Value = ChunkList;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of chunks")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<ChunkList, A::Error> {
                read_list(seq, MAX_CHUNKS, || {
                    format!(
                        "more than {MAX_CHUNKS} chunks in one request (the API's ceiling; the server's limits.max_chunks may be lower)"
                    )
                })
                .map(ChunkList)
            }
        }
        d.deserialize_seq(List)
    }
}

/// For `#[serde(deserialize_with = "crate::bounded::chunk_list")]`: a chunk list of at
/// most [`MAX_CHUNKS`].
pub(crate) fn chunk_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ChunkRef>, D::Error> {
    ChunkList::deserialize(d).map(|l| l.0)
}

/// Reads a checked field's value: at most [`MAX_CHECKED_VALUES`] values (every scalar,
/// list and object counts one), `field` naming it in the error past that.
pub(crate) fn checked_value<'de, A: MapAccess<'de>>(
    map: &mut A,
    field: &'static str,
) -> Result<Value, A::Error> {
    let mut left = MAX_CHECKED_VALUES;
    map.next_value_seed(Counted {
        left: &mut left,
        field,
    })
}

/// A [`Value`] read while `left` counts down.
struct Counted<'a> {
    left: &'a mut usize,
    field: &'static str,
}

impl Counted<'_> {
    fn take<E: de::Error>(&mut self) -> Result<(), E> {
        match self.left.checked_sub(1) {
            Some(l) => {
                *self.left = l;
                Ok(())
            }
            None => Err(E::custom(format_args!(
                "`{}` holds more than {MAX_CHECKED_VALUES} values (it is read only to be checked)",
                self.field
            ))),
        }
    }

    fn again(&mut self) -> Counted<'_> {
        Counted {
            left: self.left,
            field: self.field,
        }
    }
}

impl<'de> DeserializeSeed<'de> for Counted<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Counted<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(mut self, v: bool) -> Result<Value, E> {
        self.take()?;
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(mut self, v: i64) -> Result<Value, E> {
        self.take()?;
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E: de::Error>(mut self, v: u64) -> Result<Value, E> {
        self.take()?;
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(mut self, v: f64) -> Result<Value, E> {
        self.take()?;
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E: de::Error>(mut self, v: &str) -> Result<Value, E> {
        self.take()?;
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(mut self, v: String) -> Result<Value, E> {
        self.take()?;
        Ok(Value::String(v))
    }

    fn visit_unit<E: de::Error>(mut self) -> Result<Value, E> {
        self.take()?;
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        self.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<Value, A::Error> {
        self.take()?;
        let mut v = Vec::new();
        while let Some(x) = seq.next_element_seed(self.again())? {
            v.push(x);
        }
        Ok(Value::Array(v))
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<Value, A::Error> {
        self.take()?;
        let mut m = Map::new();
        while let Some(k) = map.next_key::<String>()? {
            let v = map.next_value_seed(self.again())?;
            m.insert(k, v);
        }
        Ok(Value::Object(m))
    }
}

/// `T`, read through [`checked_value`]'s count: for the unserved fields' `Option<Value>`.
pub(crate) fn checked<'de, A, T>(map: &mut A, field: &'static str) -> Result<Option<T>, A::Error>
where
    A: MapAccess<'de>,
    T: de::DeserializeOwned,
{
    match checked_value(map, field)? {
        Value::Null => Ok(None),
        v => T::deserialize(v).map(Some).map_err(de::Error::custom),
    }
}
