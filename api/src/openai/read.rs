//! Reading the OpenAI request types, by hand and in one pass.
//!
//! serde's derive buffers every field a struct does not know into an in-memory tree when the
//! struct `#[serde(flatten)]`s another (as the requests share [`CommonFields`]), and an
//! untagged enum buffers its value before trying each variant. That tree costs 32 bytes a
//! value: a body of small numbers in a field the server ignores grew about 16× (32× at its
//! peak) while it was read, past the body budget it was admitted under. Here each known
//! field is read straight into its type, lists and checked fields within a count
//! ([`crate::bounded`]), and every other field is skipped ([`IgnoredAny`]): an unknown field
//! costs nothing however large (`tests/parse_memory.rs` pins it).
//!
//! As derive would: a field given twice is an error, a missing required field is named, and
//! only a JSON object is a request (see [`crate::object`]). As OpenAI reads it: `null` is an
//! absent optional field everywhere, a flag included. Each reader takes its struct apart field by field
//! (no `..`), so a field added to a request type does not compile until it is read here.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

use serde_json::Value;

use super::{
    ChatMessage, ChatRequest, CommonFields, CompletionRequest, Content, ContentPart, Prompt, Stop,
    VLLM_EXTENSIONS,
};
use crate::bounded::{self, ChunkList, MAX_MESSAGE_ITEMS, read_list};
use crate::object::Object;

/// The fields of one object read so far: a second one of a name is an error.
#[derive(Default)]
struct Seen(Vec<&'static str>);

impl Seen {
    /// Notes `name`, refusing it if it came before.
    fn note<E: de::Error>(&mut self, name: &'static str) -> Result<(), E> {
        if self.0.contains(&name) {
            return Err(E::duplicate_field(name));
        }
        self.0.push(name);
        Ok(())
    }

    /// Whether `name` was read.
    fn has(&self, name: &str) -> bool {
        self.0.contains(&name)
    }

    /// Reads the next value into `slot`.
    fn read<'de, A, T>(
        &mut self,
        map: &mut A,
        name: &'static str,
        slot: &mut T,
    ) -> Result<(), A::Error>
    where
        A: MapAccess<'de>,
        T: Deserialize<'de>,
    {
        self.note(name)?;
        *slot = map.next_value()?;
        Ok(())
    }

    /// Reads the next value into `slot`, `null` as `T`'s default (`false` for a flag).
    fn read_or_default<'de, A, T>(
        &mut self,
        map: &mut A,
        name: &'static str,
        slot: &mut T,
    ) -> Result<(), A::Error>
    where
        A: MapAccess<'de>,
        T: Default + Deserialize<'de>,
    {
        self.note(name)?;
        *slot = map.next_value::<Option<T>>()?.unwrap_or_default();
        Ok(())
    }

    /// Reads the next value into `slot` from a JSON object only (`null`: `None`).
    fn read_object<'de, A, T>(
        &mut self,
        map: &mut A,
        name: &'static str,
        slot: &mut Option<T>,
    ) -> Result<(), A::Error>
    where
        A: MapAccess<'de>,
        T: Deserialize<'de>,
    {
        self.note(name)?;
        *slot = map.next_value::<Option<Object<T>>>()?.map(|Object(t)| t);
        Ok(())
    }

    /// Reads the next value, one only checked and refused, into `slot` within
    /// [`bounded::MAX_CHECKED_VALUES`] (`null`: `None`).
    fn check<'de, A: MapAccess<'de>>(
        &mut self,
        map: &mut A,
        name: &'static str,
        slot: &mut Option<Value>,
    ) -> Result<(), A::Error> {
        self.note(name)?;
        *slot = bounded::checked(map, name)?;
        Ok(())
    }

    /// Skips the next value, noting in `given` whether it was anything but `null`.
    fn note_given<'de, A: MapAccess<'de>>(
        &mut self,
        map: &mut A,
        name: &'static str,
        given: &mut bool,
    ) -> Result<(), A::Error> {
        self.note(name)?;
        *given = map.next_value::<Option<IgnoredAny>>()?.is_some();
        Ok(())
    }
}

/// Reads every field of an object: `field` takes the ones it knows (returning `true`), the
/// rest are skipped unread.
fn each_field<'de, A, F>(mut map: A, mut field: F) -> Result<Seen, A::Error>
where
    A: MapAccess<'de>,
    F: FnMut(&str, &mut A, &mut Seen) -> Result<bool, A::Error>,
{
    let mut seen = Seen::default();
    while let Some(key) = map.next_key::<String>()? {
        if !field(&key, &mut map, &mut seen)? {
            map.next_value::<IgnoredAny>()?;
        }
    }
    Ok(seen)
}

impl CommonFields {
    /// Reads `key`'s value if it is one of these fields (or a misplaced kvquilt field).
    fn read_field<'de, A: MapAccess<'de>>(
        &mut self,
        key: &str,
        map: &mut A,
        seen: &mut Seen,
    ) -> Result<bool, A::Error> {
        let CommonFields {
            model,
            max_tokens,
            max_completion_tokens,
            temperature,
            top_p,
            seed,
            stop,
            stream,
            stream_options,
            n,
            frequency_penalty,
            presence_penalty,
            logit_bias,
            documents,
            kvquilt,
            misplaced,
            unserved_extension,
        } = self;
        match key {
            "model" => seen.read(map, "model", model)?,
            "max_tokens" => seen.read(map, "max_tokens", max_tokens)?,
            "max_completion_tokens" => {
                seen.read(map, "max_completion_tokens", max_completion_tokens)?
            }
            "temperature" => seen.read(map, "temperature", temperature)?,
            "top_p" => seen.read(map, "top_p", top_p)?,
            "seed" => {
                seen.note("seed")?;
                *seed = map.next_value::<Option<Seed>>()?.map(|Seed(s)| s);
            }
            "stop" => seen.read(map, "stop", stop)?,
            "stream" => seen.read_or_default(map, "stream", stream)?,
            "stream_options" => seen.read_object(map, "stream_options", stream_options)?,
            "n" => seen.read(map, "n", n)?,
            "frequency_penalty" => seen.read(map, "frequency_penalty", frequency_penalty)?,
            "presence_penalty" => seen.read(map, "presence_penalty", presence_penalty)?,
            "logit_bias" => {
                seen.note("logit_bias")?;
                *logit_bias = bounded::checked(map, "logit_bias")?;
            }
            "documents" => {
                seen.note("documents")?;
                *documents = map
                    .next_value::<Option<ChunkList>>()?
                    .map_or_else(Vec::new, |l| l.0);
            }
            "kvquilt" => seen.read_object(map, "kvquilt", kvquilt)?,
            "mode" => seen.note_given(map, "mode", &mut misplaced.mode)?,
            "ratio" => seen.note_given(map, "ratio", &mut misplaced.ratio)?,
            "compress" => seen.note_given(map, "compress", &mut misplaced.compress)?,
            key => match VLLM_EXTENSIONS.iter().find(|&&name| name == key) {
                Some(&name) => {
                    seen.note(name)?;
                    let value = bounded::checked_value(map, name)?;
                    if !is_no_op(name, &value) && unserved_extension.is_none() {
                        *unserved_extension = Some(name);
                    }
                }
                None => return Ok(false),
            },
        }
        Ok(true)
    }
}

/// A [`Visitor`] of a JSON object, by its type's `from_map`.
struct ObjectOf<T>(&'static str, PhantomData<T>);

/// A request type read field by field from a map.
trait FromMap: Sized {
    /// What the type is, for "expected ..." errors.
    const EXPECTING: &'static str;

    /// Reads the type's fields from `map`.
    fn from_map<'de, A: MapAccess<'de>>(map: A) -> Result<Self, A::Error>;
}

impl<'de, T: FromMap> Visitor<'de> for ObjectOf<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        T::from_map(map)
    }
}

/// Deserialises `T` from a JSON object.
fn from_object<'de, D: Deserializer<'de>, T: FromMap>(d: D) -> Result<T, D::Error> {
    d.deserialize_map(ObjectOf(T::EXPECTING, PhantomData))
}

impl FromMap for CommonFields {
    const EXPECTING: &'static str = "a JSON object";

    fn from_map<'de, A: MapAccess<'de>>(map: A) -> Result<Self, A::Error> {
        let mut common = CommonFields::default();
        each_field(map, |key, map, seen| common.read_field(key, map, seen))?;
        Ok(common)
    }
}

impl<'de> Deserialize<'de> for CommonFields {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_object(d)
    }
}

impl FromMap for ChatRequest {
    const EXPECTING: &'static str = "a chat request (a JSON object)";

    fn from_map<'de, A: MapAccess<'de>>(map: A) -> Result<Self, A::Error> {
        let mut r = ChatRequest::default();
        let ChatRequest {
            messages,
            logprobs,
            top_logprobs,
            tools,
            tool_choice,
            functions,
            function_call,
            response_format,
            common,
        } = &mut r;
        let seen = each_field(map, |key, map, seen| {
            match key {
                "messages" => {
                    seen.note("messages")?;
                    *messages = map.next_value_seed(Messages)?;
                }
                "logprobs" => seen.read_or_default(map, "logprobs", logprobs)?,
                "top_logprobs" => seen.read(map, "top_logprobs", top_logprobs)?,
                "tools" => seen.check(map, "tools", tools)?,
                "tool_choice" => seen.check(map, "tool_choice", tool_choice)?,
                "functions" => seen.check(map, "functions", functions)?,
                "function_call" => seen.check(map, "function_call", function_call)?,
                "response_format" => seen.check(map, "response_format", response_format)?,
                _ => return common.read_field(key, map, seen),
            }
            Ok(true)
        })?;
        if !seen.has("messages") {
            return Err(de::Error::missing_field("messages"));
        }
        Ok(r)
    }
}

impl<'de> Deserialize<'de> for ChatRequest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_object(d)
    }
}

impl FromMap for CompletionRequest {
    const EXPECTING: &'static str = "a completion request (a JSON object)";

    fn from_map<'de, A: MapAccess<'de>>(map: A) -> Result<Self, A::Error> {
        let mut given_prompt = None;
        let mut r = CompletionRequest::new("");
        let CompletionRequest {
            prompt,
            logprobs,
            echo,
            best_of,
            suffix,
            common,
        } = &mut r;
        each_field(map, |key, map, seen| {
            match key {
                "prompt" => seen.read(map, "prompt", &mut given_prompt)?,
                "logprobs" => seen.read(map, "logprobs", logprobs)?,
                "echo" => seen.read_or_default(map, "echo", echo)?,
                "best_of" => seen.read(map, "best_of", best_of)?,
                "suffix" => seen.read(map, "suffix", suffix)?,
                _ => return common.read_field(key, map, seen),
            }
            Ok(true)
        })?;
        // `"prompt": null` is as absent as any other field
        *prompt = given_prompt.ok_or_else(|| de::Error::missing_field("prompt"))?;
        Ok(r)
    }
}

impl<'de> Deserialize<'de> for CompletionRequest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_object(d)
    }
}

/// `messages`: its messages and their content parts together at most [`MAX_MESSAGE_ITEMS`]
/// (a body of `{"role":""}` held 6–9× its size as messages).
struct Messages;

/// What is left of a chat request's [`MAX_MESSAGE_ITEMS`].
struct Items(usize);

impl Items {
    /// Counts one more message or part.
    fn take<E: de::Error>(&mut self) -> Result<(), E> {
        self.0 = self.0.checked_sub(1).ok_or_else(|| {
            E::custom(format_args!(
                "a chat request holds at most {MAX_MESSAGE_ITEMS} messages and content parts"
            ))
        })?;
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for Messages {
    type Value = Vec<ChatMessage>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<ChatMessage>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Messages {
    type Value = Vec<ChatMessage>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of messages")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<ChatMessage>, A::Error> {
        let mut items = Items(MAX_MESSAGE_ITEMS);
        let mut v = Vec::new();
        while let Some(m) = seq.next_element_seed(Message(&mut items))? {
            v.push(m);
        }
        Ok(v)
    }
}

/// One message (a JSON object: `role`, `content`; other fields skipped), counted.
struct Message<'a>(&'a mut Items);

impl<'de> DeserializeSeed<'de> for Message<'_> {
    type Value = ChatMessage;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<ChatMessage, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Message<'_> {
    type Value = ChatMessage;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a message (a JSON object with `role` and `content`)")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ChatMessage, A::Error> {
        let Message(items) = self;
        items.take()?;
        let (mut role, mut content) = (None, None);
        each_field(map, |key, map, seen| {
            match key {
                "role" => seen.read(map, "role", &mut role)?,
                "content" => {
                    seen.note("content")?;
                    content = map.next_value_seed(Parts(&mut *items))?;
                }
                _ => return Ok(false),
            }
            Ok(true)
        })?;
        Ok(ChatMessage {
            role: role.ok_or_else(|| de::Error::missing_field("role"))?,
            content,
        })
    }
}

/// What a message's `content` is, for "expected ..." errors.
const CONTENT_EXPECTED: &str = "a message's text or a list of content parts";

/// A message's `content` (`null`: none), its parts counted.
struct Parts<'a>(&'a mut Items);

impl<'de> DeserializeSeed<'de> for Parts<'_> {
    type Value = Option<Content>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<Content>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Parts<'_> {
    type Value = Option<Content>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(CONTENT_EXPECTED)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Option<Content>, E> {
        Ok(None)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Option<Content>, E> {
        Ok(Some(Content::Text(v.to_owned())))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Option<Content>, E> {
        Ok(Some(Content::Text(v)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Option<Content>, A::Error> {
        let mut parts = Vec::new();
        while let Some(p) = seq.next_element::<ContentPart>()? {
            self.0.take()?;
            parts.push(p);
        }
        Ok(Some(Content::Parts(parts)))
    }
}

/// Whether `value` of the vLLM/SGLang extension `name` is the one that changes nothing
/// (vLLM's defaults): `null`, and per field a disabled sampler (`top_k` -1 or 0, `min_p` 0,
/// penalties 1), zero, `false`, an empty list, or, for the flags on by default
/// (`skip_special_tokens`, `spaces_between_special_tokens`, `add_generation_prompt`),
/// `true`.
fn is_no_op(name: &str, value: &Value) -> bool {
    let number = |ok: &[f64]| value.as_f64().is_some_and(|v| ok.contains(&v));
    value.is_null()
        || match name {
            "top_k" => number(&[-1.0, 0.0]),
            "min_p" | "min_tokens" => number(&[0.0]),
            "repetition_penalty" | "length_penalty" => number(&[1.0]),
            "skip_special_tokens" | "spaces_between_special_tokens" | "add_generation_prompt" => {
                value.as_bool() == Some(true)
            }
            "stop_token_ids" | "bad_words" | "logits_processors" => {
                value.as_array().is_some_and(Vec::is_empty)
            }
            "ignore_eos"
            | "echo"
            | "no_stop_trim"
            | "include_stop_str_in_output"
            | "use_beam_search"
            | "return_tokens_as_token_ids"
            | "continue_final_message" => value.as_bool() == Some(false),
            // guided decoding, structured outputs, a template of the caller's, prompt
            // logprobs (vLLM returns them for any value, 0 too), a truncation or an allowed
            // set: no value is a no-op
            _ => false,
        }
}

/// `seed`: any JSON integer (OpenAI's SDKs and vLLM take negative ones); a negative seed is
/// its two's complement as `u64`, so each integer is its own seed.
struct Seed(u64);

impl<'de> Deserialize<'de> for Seed {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Integer;
        impl<'de> Visitor<'de> for Integer {
            type Value = Seed;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer seed")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Seed, E> {
                Ok(Seed(v))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Seed, E> {
                Ok(Seed(v as u64))
            }
        }
        d.deserialize_any(Integer)
    }
}

/// For `#[serde(deserialize_with)]` on a flag: `null` is `false`, as OpenAI reads it.
pub(super) fn null_as_false<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

/// `stop`: one string, or a list of at most 4 (a longer one is refused as it is read).
impl<'de> Deserialize<'de> for Stop {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct S;
        impl<'de> Visitor<'de> for S {
            type Value = Stop;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a stop string or a list of them")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Stop, E> {
                Ok(Stop::One(v.to_owned()))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<Stop, E> {
                Ok(Stop::One(v))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Stop, A::Error> {
                read_list(seq, 4, || "at most 4 stop sequences".to_owned()).map(Stop::Many)
            }
        }
        d.deserialize_any(S)
    }
}

/// One element of a `prompt` list: a string, a token id, or a list of token ids.
enum PromptItem {
    Text(String),
    Token(u32),
    Tokens(Vec<u32>),
}

impl<'de> Deserialize<'de> for PromptItem {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Item;
        impl<'de> Visitor<'de> for Item {
            type Value = PromptItem;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a prompt string, a token id or a list of token ids")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<PromptItem, E> {
                Ok(PromptItem::Text(v.to_owned()))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<PromptItem, E> {
                Ok(PromptItem::Text(v))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PromptItem, E> {
                u32::try_from(v)
                    .map(PromptItem::Token)
                    .map_err(|_| E::custom(format_args!("token id {v} is past u32")))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PromptItem, E> {
                Err(E::custom(format_args!("token id {v} is negative")))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<PromptItem, A::Error> {
                let mut ids = Vec::new();
                while let Some(t) = seq.next_element::<u32>()? {
                    ids.push(t);
                }
                Ok(PromptItem::Tokens(ids))
            }
        }
        d.deserialize_any(Item)
    }
}

impl<'de> Deserialize<'de> for Prompt {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct P;
        impl<'de> Visitor<'de> for P {
            type Value = Prompt;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a prompt string, a list of one, or token ids")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Prompt, E> {
                Ok(Prompt::One(v.to_owned()))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<Prompt, E> {
                Ok(Prompt::One(v))
            }

            /// The first element says which list it is; a second prompt (a string or a
            /// token list) is refused as it is read: batches are not served.
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Prompt, A::Error> {
                let batch = || de::Error::custom(PROMPT_BATCH);
                let prompt = match seq.next_element::<PromptItem>()? {
                    None => return Ok(Prompt::Many(Vec::new())),
                    Some(PromptItem::Text(t)) => Prompt::Many(vec![t]),
                    Some(PromptItem::Tokens(ids)) => Prompt::Tokens(ids),
                    Some(PromptItem::Token(first)) => {
                        let mut ids = vec![first];
                        while let Some(t) = seq.next_element::<u32>()? {
                            ids.push(t);
                        }
                        return Ok(Prompt::Tokens(ids));
                    }
                };
                match seq.next_element::<IgnoredAny>()? {
                    None => Ok(prompt),
                    Some(_) => Err(batch()),
                }
            }
        }
        d.deserialize_any(P)
    }
}

/// Why a `prompt` of several prompts is refused.
const PROMPT_BATCH: &str = "`prompt` must be one prompt (batches are not supported)";

/// A message's content on its own, as a chat request's messages read it (`Parts`), its
/// parts not counted.
impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Parts(&mut Items(usize::MAX))
            .deserialize(d)?
            .ok_or_else(|| de::Error::invalid_type(de::Unexpected::Unit, &CONTENT_EXPECTED))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::{ChatMessage, StreamOptions};
    use super::*;
    use crate::blend::ModeSpec;
    use crate::chunks::ChunkRef;

    fn chat(v: serde_json::Value) -> Result<ChatRequest, String> {
        serde_json::from_value(v).map_err(|e| e.to_string())
    }

    fn completion(v: serde_json::Value) -> Result<CompletionRequest, String> {
        serde_json::from_value(v).map_err(|e| e.to_string())
    }

    #[test]
    fn a_written_request_reads_back_as_it_was() {
        let c = ChatRequest {
            logprobs: true,
            top_logprobs: Some(3),
            tools: Some(json!([])),
            tool_choice: Some(json!("none")),
            response_format: Some(json!({"type": "text"})),
            messages: vec![
                ChatMessage::system("s"),
                ChatMessage {
                    role: "user".into(),
                    content: Some(Content::Parts(vec![ContentPart {
                        kind: "text".into(),
                        text: Some("q".into()),
                    }])),
                },
            ],
            common: CommonFields {
                model: Some("m".into()),
                max_tokens: Some(5),
                max_completion_tokens: Some(6),
                temperature: Some(0.5),
                top_p: Some(0.9),
                seed: Some(7),
                stop: Some(Stop::Many(vec!["a".into(), "b".into()])),
                stream: true,
                stream_options: Some(StreamOptions {
                    include_usage: true,
                }),
                n: Some(1),
                frequency_penalty: Some(0.0),
                presence_penalty: Some(0.0),
                logit_bias: Some(serde_json::Map::new()),
                documents: vec![ChunkRef::text("d"), ChunkRef::tokens(vec![1, 2])],
                kvquilt: Some(ModeSpec {
                    mode: Some("blend".into()),
                    ..ModeSpec::default()
                }),
                ..CommonFields::default()
            },
            ..ChatRequest::default()
        };
        let back = chat(serde_json::to_value(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        let mut p = CompletionRequest::new("p");
        (p.logprobs, p.echo, p.best_of, p.suffix) = (Some(2), true, Some(1), Some(String::new()));
        p.common.stop = Some(Stop::One("x".into()));
        let back = completion(serde_json::to_value(&p).unwrap()).unwrap();
        assert_eq!(back, p);
        assert_eq!(
            serde_json::from_value::<CommonFields>(serde_json::to_value(&c.common).unwrap())
                .unwrap(),
            c.common
        );
    }

    #[test]
    fn unknown_fields_are_skipped_and_null_is_absent() {
        let r = chat(json!({
            "messages": [{"role": "user", "content": null, "name": "x"}],
            "user": "u", "metadata": {"a": [1, 2]}, "store": false,
            "stream": null, "logprobs": null, "documents": null, "kvquilt": null,
            "stop": null, "mode": null,
        }))
        .unwrap();
        assert_eq!(
            r,
            ChatRequest::new(vec![ChatMessage {
                role: "user".into(),
                content: None
            }])
        );
        assert_eq!(r.common.misplaced.first(), None);
        let p = completion(json!({"prompt": ["a"], "echo": null, "suffix": null})).unwrap();
        assert_eq!(p.prompt, Prompt::Many(vec!["a".into()]));
        // token ids, as vLLM takes them (and lm-eval sends them)
        for v in [json!([1, 2, 3]), json!([[1, 2, 3]])] {
            assert_eq!(
                completion(json!({"prompt": v})).unwrap().prompt,
                Prompt::Tokens(vec![1, 2, 3])
            );
        }
        let p = CompletionRequest {
            prompt: Prompt::Tokens(vec![7, 8]),
            ..CompletionRequest::new("")
        };
        assert_eq!(completion(serde_json::to_value(&p).unwrap()).unwrap(), p);
        // what OpenAI's SDKs and vLLM take: a null flag inside an object, a negative seed
        let r =
            chat(json!({"messages": [], "stream_options": {"include_usage": null}, "seed": -1}))
                .unwrap();
        assert_eq!(
            r.common.stream_options,
            Some(StreamOptions {
                include_usage: false
            })
        );
        assert_eq!(r.common.seed, Some(u64::MAX));
        assert!(chat(json!({"messages": [], "seed": 1.5})).is_err());
    }

    #[test]
    fn misplaced_fields_are_noted_whatever_their_value() {
        let r = chat(json!({"messages": [], "ratio": 0.15, "compress": {}})).unwrap();
        assert!(r.common.misplaced.ratio && r.common.misplaced.compress);
        assert!(!r.common.misplaced.mode);
        assert_eq!(r.common.misplaced.first(), Some("ratio"));
        let p = completion(json!({"prompt": "p", "mode": [1]})).unwrap();
        assert_eq!(p.common.misplaced.first(), Some("mode"));
    }

    #[test]
    fn bad_requests_are_refused_naming_the_problem() {
        let cases = [
            (
                chat(json!({"model": "m"})).map(drop),
                "missing field `messages`",
            ),
            (
                chat(json!({"messages": null})).map(drop),
                "invalid type: null",
            ),
            (
                completion(json!({"max_tokens": 3})).map(drop),
                "missing field `prompt`",
            ),
            (
                completion(json!({"prompt": null})).map(drop),
                "missing field `prompt`",
            ),
            (
                completion(json!({"prompt": 3})).map(drop),
                "expected a prompt string, a list of one, or token ids",
            ),
            (
                completion(json!({"prompt": "p", "stop": 3})).map(drop),
                "expected a stop string or a list",
            ),
            (
                completion(json!({"prompt": "p", "stop": [3]})).map(drop),
                "expected a string",
            ),
            (
                chat(json!({"messages": [{"role": "user", "content": 3}]})).map(drop),
                "expected a message's text or a list of content parts",
            ),
            (
                chat(json!({"messages": [], "kvquilt": []})).map(drop),
                "expected a JSON object",
            ),
            (
                chat(json!({"messages": [], "stream_options": 1})).map(drop),
                "expected a JSON object",
            ),
            (
                chat(json!({"messages": [], "stream": "yes"})).map(drop),
                "expected a boolean",
            ),
            (
                chat(json!([[]])).map(drop),
                "expected a chat request (a JSON object)",
            ),
            (
                completion(json!(["p"])).map(drop),
                "expected a completion request (a JSON object)",
            ),
        ];
        for (i, (got, want)) in cases.into_iter().enumerate() {
            let e = got.expect_err(&format!("case {i} was read"));
            assert!(e.contains(want), "case {i}: {e}");
        }
        // lists past what the server serves, and checked fields past their count, are
        // refused as they are read
        let many = |n: usize, v: serde_json::Value| serde_json::Value::Array(vec![v; n]);
        let counted = [
            (chat(json!({"messages": [], "stop": many(5, json!("s"))})).map(drop), "at most 4 stop sequences"),
            (completion(json!({"prompt": ["a", "b"]})).map(drop), "batches are not supported"),
            (completion(json!({"prompt": [[1], [2]]})).map(drop), "batches are not supported"),
            (completion(json!({"prompt": [1, "a"]})).map(drop), "invalid type: string"),
            (completion(json!({"prompt": ["a", 1]})).map(drop), "batches are not supported"),
            (completion(json!({"prompt": [-1]})).map(drop), "token id -1 is negative"),
            (completion(json!({"prompt": [[4294967296u64]]})).map(drop), "u32"),
            (chat(json!({"messages": [], "documents": many(4097, json!("d"))})).map(drop), "more than 4096 chunks in one request"),
            (
                serde_json::from_value::<crate::BlendRequest>(json!({"chunks": many(4097, json!("d"))}))
                    .map(drop)
                    .map_err(|e| e.to_string()),
                "more than 4096 chunks in one request",
            ),
            (
                serde_json::from_value::<crate::PutChunksRequest>(json!({"chunks": many(4097, json!("d"))}))
                    .map(drop)
                    .map_err(|e| e.to_string()),
                "more than 4096 chunks in one request",
            ),
            (chat(json!({"messages": [], "tools": many(4096, json!(0))})).map(drop), "`tools` holds more than 4096 values"),
            (
                chat(json!({"messages": [], "response_format": {"type": "text", "x": many(4095, json!({}))}})).map(drop),
                "`response_format` holds more than 4096 values",
            ),
            (chat(json!({"messages": [], "logit_bias": []})).map(drop), "expected a map"),
        ];
        for (i, (got, want)) in counted.into_iter().enumerate() {
            let e = got.expect_err(&format!("counted {i} was read"));
            assert!(e.contains(want), "counted {i}: {e}");
        }
        // messages and their parts are counted together
        let msgs = |n: usize, m: serde_json::Value| chat(json!({"messages": many(n, m)})).map(drop);
        let parts = |n: usize| json!({"role": "user", "content": many(n, json!({"type": "text", "text": "t"}))});
        let limit = "at most 65536 messages and content parts";
        for (i, (got, ok)) in [
            (msgs(65536, json!({"role": "user"})), true),
            (msgs(65537, json!({"role": "user"})), false),
            (msgs(1, parts(65535)), true),
            (msgs(1, parts(65536)), false),
            (msgs(2, parts(32767)), true),
            (msgs(2, parts(32768)), false),
        ]
        .into_iter()
        .enumerate()
        {
            match got {
                Ok(()) => assert!(ok, "items {i} was read"),
                Err(e) => assert!(!ok && e.contains(limit), "items {i}: {e}"),
            }
        }
        let r = chat(json!({"messages": [
            {"role": "user", "content": null, "name": "n", "tool_calls": [1, 2]},
            {"role": "assistant", "content": [{"type": "text", "text": "a"}]},
        ]}))
        .unwrap();
        assert_eq!(
            r.messages[0],
            ChatMessage {
                role: "user".into(),
                content: None
            }
        );
        assert_eq!(
            r.messages[1].content,
            Some(Content::Parts(vec![ContentPart {
                kind: "text".into(),
                text: Some("a".into())
            }]))
        );
        for (i, (m, want)) in [
            (json!({"content": "c"}), "missing field `role`"),
            (json!(["user", "c"]), "expected a message"),
            (
                json!({"role": "user", "content": 3}),
                "expected a message's text or a list",
            ),
        ]
        .into_iter()
        .enumerate()
        {
            let got = chat(json!({"messages": [m]}));
            assert!(
                got.as_ref().err().is_some_and(|e| e.contains(want)),
                "message {i}: {got:?}"
            );
        }
        let e =
            serde_json::from_str::<ChatRequest>(r#"{"messages": [{"role": "a", "role": "b"}]}"#)
                .expect_err("a role given twice");
        assert!(e.to_string().contains("duplicate field `role`"), "{e}");

        // vLLM's and SGLang's extensions: their defaults pass, anything else is noted
        let ext = |v: serde_json::Value| chat(v).unwrap().common.unserved_extension;
        assert_eq!(
            ext(
                json!({"messages": [], "top_k": -1, "min_p": 0, "repetition_penalty": 1.0,
                       "ignore_eos": false, "skip_special_tokens": true, "stop_token_ids": [],
                       "guided_json": null, "chat_template_kwargs": {"enable_thinking": false}})
            ),
            None
        );
        for (v, name) in [
            (json!({"messages": [], "top_k": 40}), "top_k"),
            (json!({"messages": [], "ignore_eos": true}), "ignore_eos"),
            (
                json!({"messages": [], "guided_json": {"type": "object"}}),
                "guided_json",
            ),
            (
                json!({"messages": [], "skip_special_tokens": false}),
                "skip_special_tokens",
            ),
            (
                json!({"messages": [], "min_p": 0.0, "repetition_penalty": 1.1}),
                "repetition_penalty",
            ),
            (
                json!({"messages": [], "prompt_logprobs": 0}),
                "prompt_logprobs",
            ),
            (json!({"messages": [], "echo": true}), "echo"),
            (
                json!({"messages": [], "truncate_prompt_tokens": 8}),
                "truncate_prompt_tokens",
            ),
        ] {
            assert_eq!(ext(v), Some(name));
        }
        assert!(
            completion(json!({"prompt": "p", "min_tokens": 5}))
                .unwrap()
                .common
                .unserved_extension
                .is_some()
        );

        // up to the count they read as before
        let r = chat(json!({
            "messages": [],
            "stop": many(4, json!("s")),
            "documents": many(4096, json!("d")),
            "tools": many(4095, json!(0)),
            "logit_bias": {"1": 0},
        }))
        .unwrap();
        assert_eq!(r.common.stop, Some(Stop::Many(vec!["s".into(); 4])));
        assert_eq!(r.common.documents.len(), 4096);
        assert_eq!(r.tools, Some(many(4095, json!(0))));
        assert_eq!(r.common.logit_bias.map(|m| m.len()), Some(1));

        // a field given twice (serde_json's `json!` keeps one, so the text is read)
        let twice = [
            serde_json::from_str::<ChatRequest>(r#"{"messages": [], "seed": 1, "seed": 2}"#)
                .map(drop),
            serde_json::from_str::<ChatRequest>(r#"{"messages": [], "messages": []}"#).map(drop),
            serde_json::from_str::<CompletionRequest>(r#"{"prompt": "p", "mode": 1, "mode": 2}"#)
                .map(drop),
        ];
        for (i, got) in twice.into_iter().enumerate() {
            let e = got.expect_err(&format!("twice {i} was read")).to_string();
            assert!(e.contains("duplicate field"), "twice {i}: {e}");
        }
    }
}
