//! A pickle reader for PyTorch checkpoints that builds data and never calls anything.
//!
//! Why our own and not candle's `pickle` module: candle's reader copies an object each time
//! the pickle fetches it from its memo (a 604-byte memo bomb grows memory without bound),
//! builds nested boxes that are dropped recursively (nesting 100k deep overflows the stack),
//! and indexes rebuild arguments without checking their count (short tuples panic). Here
//! objects live in one arena and the stack, the memo and containers hold indices into it, so
//! memory grows at most linearly in the pickle's length, a memo fetch is a copy of an index
//! (and sees later changes, as Python's references do), and nothing is recursive.
//!
//! Calls are checked as they are read: REDUCE and NEWOBJ may only name an allowed function
//! (the caller's list); everything else is refused. `collections.OrderedDict()` becomes a
//! plain dict, as torch's state dicts need.

use anyhow::{bail, Result};
use std::collections::HashMap;

/// The index of an object in [`Pickle::objects`].
pub type Id = usize;

/// One object of the pickle, its parts as indices.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    None,
    Bool(bool),
    Int(i64),
    /// An integer that does not fit 64 bits (never part of a tensor's description).
    BigInt,
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Id>),
    List(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    /// A module attribute named by GLOBAL or STACK_GLOBAL.
    Global {
        module: String,
        name: String,
    },
    /// An allowed function called with `args` (REDUCE, NEWOBJ), and the state BUILD gave it.
    Call {
        func: Id,
        args: Id,
        state: Option<Id>,
    },
    /// A reference to data outside the pickle (a tensor's storage, for torch).
    PersistentId(Id),
}

/// A parsed pickle: its objects and the one STOP returned.
#[derive(Debug)]
pub struct Pickle {
    pub objects: Vec<Object>,
    pub root: Id,
}

impl Pickle {
    pub fn get(&self, id: Id) -> &Object {
        &self.objects[id]
    }

    /// The text of a `Str` object.
    pub fn str(&self, id: Id) -> Option<&str> {
        match self.get(id) {
            Object::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The items of a tuple (or list).
    pub fn items(&self, id: Id) -> Option<&[Id]> {
        match self.get(id) {
            Object::Tuple(v) | Object::List(v) => Some(v),
            _ => None,
        }
    }

    /// The value of an integer object.
    pub fn int(&self, id: Id) -> Option<i64> {
        match self.get(id) {
            Object::Int(i) => Some(*i),
            Object::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    /// `(module, name)` of a `Global`.
    pub fn global(&self, id: Id) -> Option<(&str, &str)> {
        match self.get(id) {
            Object::Global { module, name } => Some((module, name)),
            _ => None,
        }
    }

    /// The value under the string key `key` of a dict, the last one as Python keeps it.
    pub fn dict_get(&self, dict: Id, key: &str) -> Option<Id> {
        match self.get(dict) {
            Object::Dict(kv) => kv
                .iter()
                .rev()
                .find(|(k, _)| self.str(*k) == Some(key))
                .map(|(_, v)| *v),
            _ => None,
        }
    }
}

/// What is on the pickle machine's stack.
#[derive(Clone, Copy)]
enum Item {
    Mark,
    Obj(Id),
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    objects: Vec<Object>,
    stack: Vec<Item>,
    memo: HashMap<u32, Id>,
    allowed: &'a dyn Fn(&str, &str) -> bool,
}

/// Reads `data` as a pickle (protocols 0 to 5, the opcodes torch and numpy objects use),
/// refusing calls to functions `allowed` does not accept.
pub fn parse(data: &[u8], allowed: &dyn Fn(&str, &str) -> bool) -> Result<Pickle> {
    let mut m = Machine {
        data,
        pos: 0,
        objects: Vec::new(),
        stack: Vec::new(),
        memo: HashMap::new(),
        allowed,
    };
    loop {
        let at = m.pos;
        let op = m.byte()?;
        match m.step(op) {
            Ok(Some(root)) => {
                return Ok(Pickle {
                    objects: m.objects,
                    root,
                })
            }
            Ok(None) => {}
            Err(e) => return Err(e.context(format!("at byte {at} (opcode 0x{op:02x})"))),
        }
    }
}

impl Machine<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let Some(end) = end else {
            bail!("the pickle ends early (needs {n} more bytes)");
        };
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn byte(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn le<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.le()?))
    }

    fn len64(&mut self) -> Result<usize> {
        usize::try_from(u64::from_le_bytes(self.le()?))
            .map_err(|_| anyhow::anyhow!("length too large"))
    }

    /// A text line of a protocol-0 opcode (at most 1 KiB), without its newline.
    fn line(&mut self) -> Result<&str> {
        let rest = &self.data[self.pos..];
        let Some(n) = rest.iter().take(1024).position(|&b| b == b'\n') else {
            bail!("a text argument has no newline within 1 KiB");
        };
        let s = std::str::from_utf8(&rest[..n])
            .map_err(|_| anyhow::anyhow!("a text argument is not UTF-8"))?;
        self.pos += n + 1;
        Ok(s.strip_suffix('\r').unwrap_or(s))
    }

    fn text(&mut self, n: usize) -> Result<String> {
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| anyhow::anyhow!("a string is not UTF-8"))
    }

    fn add(&mut self, o: Object) -> Id {
        self.objects.push(o);
        self.objects.len() - 1
    }

    fn push(&mut self, o: Object) {
        let id = self.add(o);
        self.stack.push(Item::Obj(id));
    }

    fn pop(&mut self) -> Result<Id> {
        match self.stack.pop() {
            Some(Item::Obj(id)) => Ok(id),
            Some(Item::Mark) => bail!("an object was expected, a mark was found"),
            None => bail!("the stack is empty"),
        }
    }

    fn top(&self) -> Result<Id> {
        match self.stack.last() {
            Some(Item::Obj(id)) => Ok(*id),
            Some(Item::Mark) => bail!("an object was expected, a mark was found"),
            None => bail!("the stack is empty"),
        }
    }

    /// The objects above the topmost mark, which is removed.
    fn pop_mark(&mut self) -> Result<Vec<Id>> {
        let Some(m) = self.stack.iter().rposition(|i| matches!(i, Item::Mark)) else {
            bail!("no mark on the stack");
        };
        let items = self.stack.split_off(m + 1);
        self.stack.pop();
        Ok(items
            .into_iter()
            .map(|i| match i {
                Item::Obj(id) => id,
                Item::Mark => unreachable!("the topmost mark was found"),
            })
            .collect())
    }

    fn memo_get(&mut self, key: u32) -> Result<()> {
        let Some(&id) = self.memo.get(&key) else {
            bail!("memo entry {key} is read before it is written");
        };
        self.stack.push(Item::Obj(id));
        Ok(())
    }

    fn memo_put(&mut self, key: u32) -> Result<()> {
        let id = self.top()?;
        self.memo.insert(key, id);
        Ok(())
    }

    /// The function a REDUCE or NEWOBJ calls, refused unless the caller allows it.
    fn callable(&self, func: Id) -> Result<(&str, &str)> {
        match &self.objects[func] {
            Object::Global { module, name } => {
                if !(self.allowed)(module, name) {
                    bail!(
                        "the pickle calls {module}.{name}, which is not a tensor-rebuild function"
                    );
                }
                Ok((module, name))
            }
            _ => bail!("the pickle calls an object that is not a named function"),
        }
    }

    fn call(&mut self, func: Id, args: Id) -> Result<()> {
        let (module, name) = self.callable(func)?;
        if (module, name) == ("collections", "OrderedDict") {
            if !matches!(&self.objects[args], Object::Tuple(a) if a.is_empty()) {
                bail!("collections.OrderedDict is called with arguments");
            }
            self.push(Object::Dict(Vec::new()));
        } else {
            self.push(Object::Call {
                func,
                args,
                state: None,
            });
        }
        Ok(())
    }

    fn list_mut(&mut self, id: Id) -> Result<&mut Vec<Id>> {
        match &mut self.objects[id] {
            Object::List(v) => Ok(v),
            _ => bail!("APPEND to an object that is not a list"),
        }
    }

    fn dict_mut(&mut self, id: Id) -> Result<&mut Vec<(Id, Id)>> {
        match &mut self.objects[id] {
            Object::Dict(v) => Ok(v),
            _ => bail!("SETITEM on an object that is not a dict"),
        }
    }

    fn pairs(items: Vec<Id>) -> Result<Vec<(Id, Id)>> {
        if !items.len().is_multiple_of(2) {
            bail!("a dict is given an odd number of keys and values");
        }
        Ok(items.chunks_exact(2).map(|kv| (kv[0], kv[1])).collect())
    }

    /// Runs one opcode; `Some(root)` at STOP.
    fn step(&mut self, op: u8) -> Result<Option<Id>> {
        match op {
            // PROTO, FRAME: framing only
            0x80 => {
                self.byte()?;
            }
            0x95 => {
                self.take(8)?;
            }
            b'.' => return self.pop().map(Some),
            b'(' => self.stack.push(Item::Mark),
            b'0' => {
                self.stack
                    .pop()
                    .ok_or_else(|| anyhow::anyhow!("POP on an empty stack"))?;
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let top = self.top()?;
                self.stack.push(Item::Obj(top));
            }
            b'N' => self.push(Object::None),
            0x88 => self.push(Object::Bool(true)),
            0x89 => self.push(Object::Bool(false)),
            b'I' => {
                let o = match self.line()? {
                    "01" => Object::Bool(true),
                    "00" => Object::Bool(false),
                    s => Object::Int(s.parse().map_err(|_| anyhow::anyhow!("bad INT {s:?}"))?),
                };
                self.push(o)
            }
            b'J' => {
                let v = i32::from_le_bytes(self.le()?);
                self.push(Object::Int(v as i64))
            }
            b'K' => {
                let v = self.byte()?;
                self.push(Object::Int(v as i64))
            }
            b'M' => {
                let v = u16::from_le_bytes(self.le()?);
                self.push(Object::Int(v as i64))
            }
            0x8a | 0x8b => {
                let n = if op == 0x8a {
                    self.byte()? as usize
                } else {
                    self.u32()? as usize
                };
                let b = self.take(n)?;
                let o = if n <= 8 {
                    // little-endian two's complement, sign-extended
                    let mut v: i64 = if b.last().is_some_and(|&x| x & 0x80 != 0) {
                        -1
                    } else {
                        0
                    };
                    for (i, &x) in b.iter().enumerate() {
                        v &= !(0xffi64 << (8 * i));
                        v |= (x as i64) << (8 * i);
                    }
                    Object::Int(v)
                } else {
                    Object::BigInt
                };
                self.push(o)
            }
            b'G' => {
                let v = f64::from_be_bytes(self.le()?);
                self.push(Object::Float(v))
            }
            b'X' | 0x8c | 0x8d => {
                let n = match op {
                    b'X' => self.u32()? as usize,
                    0x8c => self.byte()? as usize,
                    _ => self.len64()?,
                };
                let s = self.text(n)?;
                self.push(Object::Str(s))
            }
            // BINSTRING, SHORT_BINSTRING: Python 2 byte strings, read as Latin-1
            b'T' | b'U' => {
                let n = if op == b'T' {
                    self.u32()? as usize
                } else {
                    self.byte()? as usize
                };
                let s = self.take(n)?.iter().map(|&b| b as char).collect();
                self.push(Object::Str(s))
            }
            b'B' | b'C' | 0x8e | 0x96 => {
                let n = match op {
                    b'B' => self.u32()? as usize,
                    b'C' => self.byte()? as usize,
                    _ => self.len64()?,
                };
                let b = self.take(n)?.to_vec();
                self.push(Object::Bytes(b))
            }
            b')' => self.push(Object::Tuple(Vec::new())),
            b't' => {
                let v = self.pop_mark()?;
                self.push(Object::Tuple(v))
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let mut v = (0..n).map(|_| self.pop()).collect::<Result<Vec<_>>>()?;
                v.reverse();
                self.push(Object::Tuple(v))
            }
            b']' => self.push(Object::List(Vec::new())),
            b'l' => {
                let v = self.pop_mark()?;
                self.push(Object::List(v))
            }
            b'a' => {
                let v = self.pop()?;
                let list = self.top()?;
                self.list_mut(list)?.push(v);
            }
            b'e' => {
                let v = self.pop_mark()?;
                let list = self.top()?;
                self.list_mut(list)?.extend(v);
            }
            b'}' => self.push(Object::Dict(Vec::new())),
            b'd' => {
                let kv = Self::pairs(self.pop_mark()?)?;
                self.push(Object::Dict(kv))
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                let dict = self.top()?;
                self.dict_mut(dict)?.push((k, v));
            }
            b'u' => {
                let kv = Self::pairs(self.pop_mark()?)?;
                let dict = self.top()?;
                self.dict_mut(dict)?.extend(kv);
            }
            b'c' => {
                let module = self.line()?.to_string();
                let name = self.line()?.to_string();
                self.push(Object::Global { module, name })
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                let (Object::Str(module), Object::Str(name)) =
                    (&self.objects[module], &self.objects[name])
                else {
                    bail!("STACK_GLOBAL of objects that are not strings");
                };
                let o = Object::Global {
                    module: module.clone(),
                    name: name.clone(),
                };
                self.push(o)
            }
            b'R' | 0x81 => {
                let args = self.pop()?;
                let func = self.pop()?;
                if !matches!(self.objects[args], Object::Tuple(_)) {
                    bail!("a call's arguments are not a tuple");
                }
                self.call(func, args)?;
            }
            0x92 => {
                // NEWOBJ_EX: keyword arguments are refused (torch never writes them)
                let kwargs = self.pop()?;
                let args = self.pop()?;
                let func = self.pop()?;
                if !matches!(&self.objects[kwargs], Object::Dict(kv) if kv.is_empty()) {
                    bail!("a call with keyword arguments");
                }
                self.call(func, args)?;
            }
            b'b' => {
                let state = self.pop()?;
                let target = self.top()?;
                match &mut self.objects[target] {
                    Object::Call { state: s, .. } => *s = Some(state),
                    // a state dict's attributes (torch's `_metadata`), not its items
                    Object::Dict(_) => {}
                    _ => bail!("BUILD on an object no allowed function made"),
                }
            }
            b'q' => {
                let k = self.byte()? as u32;
                self.memo_put(k)?
            }
            b'r' => {
                let k = self.u32()?;
                self.memo_put(k)?
            }
            0x94 => {
                let k = u32::try_from(self.memo.len())?;
                self.memo_put(k)?
            }
            b'p' => {
                let k = self.line()?;
                let k = k.parse().map_err(|_| anyhow::anyhow!("bad PUT {k:?}"))?;
                self.memo_put(k)?
            }
            b'h' => {
                let k = self.byte()? as u32;
                self.memo_get(k)?
            }
            b'j' => {
                let k = self.u32()?;
                self.memo_get(k)?
            }
            b'g' => {
                let k = self.line()?;
                let k = k.parse().map_err(|_| anyhow::anyhow!("bad GET {k:?}"))?;
                self.memo_get(k)?
            }
            b'Q' => {
                let id = self.pop()?;
                self.push(Object::PersistentId(id))
            }
            b'P' => {
                let s = self.line()?.to_string();
                let id = self.add(Object::Str(s));
                self.push(Object::PersistentId(id))
            }
            _ => bail!("unsupported pickle opcode"),
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn torch_allowed(module: &str, name: &str) -> bool {
        matches!(
            (module, name),
            ("collections", "OrderedDict") | ("torch._utils", "_rebuild_tensor_v2")
        )
    }

    /// `pickle.dumps({'a': [1, -2, 300, 2**40, -2**40], 'b': (1.5, None, True), 'c': 'xé'},
    /// protocol=2)` printed by Python 3.
    const PY_PROTO2: &[u8] = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01]q\x02(K\x01J\xfe\xff\xff\xffM,\x01\x8a\x06\x00\x00\x00\x00\x00\x01\x8a\x06\x00\x00\x00\x00\x00\xffeX\x01\x00\x00\x00bq\x03G?\xf8\x00\x00\x00\x00\x00\x00N\x88\x87q\x04X\x01\x00\x00\x00cq\x05X\x03\x00\x00\x00x\xc3\xa9q\x06u.";

    #[test]
    fn reads_what_python_writes() {
        let p = parse(PY_PROTO2, &torch_allowed).unwrap();
        let a = p.dict_get(p.root, "a").unwrap();
        let ints: Vec<i64> = p
            .items(a)
            .unwrap()
            .iter()
            .map(|&i| p.int(i).unwrap())
            .collect();
        assert_eq!(ints, [1, -2, 300, 1 << 40, -(1 << 40)]);
        let b = p.items(p.dict_get(p.root, "b").unwrap()).unwrap().to_vec();
        assert_eq!(p.get(b[0]), &Object::Float(1.5));
        assert_eq!(p.get(b[1]), &Object::None);
        assert_eq!(p.get(b[2]), &Object::Bool(true));
        assert_eq!(p.str(p.dict_get(p.root, "c").unwrap()), Some("xé"));
    }

    /// A memo fetch shares the object (later changes show, as in Python) instead of copying
    /// it: a memo bomb that doubles a list 200 times stays as small as its bytes.
    #[test]
    fn memo_bombs_and_deep_nesting_stay_small() {
        // l = []; then 200 times: l = [l, l]
        let mut bomb = b"\x80\x02]q\x00".to_vec();
        for i in 0..200u32 {
            bomb.extend_from_slice(b"h");
            bomb.push((i % 256) as u8);
            bomb.extend_from_slice(b"h");
            bomb.push((i % 256) as u8);
            bomb.extend_from_slice(b"\x86q");
            bomb.push(((i + 1) % 256) as u8);
        }
        bomb.push(b'.');
        let p = parse(&bomb, &torch_allowed).unwrap();
        assert!(p.objects.len() <= 201, "{}", p.objects.len());

        // 100k nested one-element lists: no recursion to overflow, dropped flat
        let mut deep = b"\x80\x02".to_vec();
        for _ in 0..100_000 {
            deep.extend_from_slice(b"(");
        }
        for _ in 0..100_000 {
            deep.extend_from_slice(b"l");
        }
        deep.push(b'.');
        let p = parse(&deep, &torch_allowed).unwrap();
        assert_eq!(p.objects.len(), 100_000);
    }

    #[test]
    fn calls_outside_the_list_and_broken_pickles_are_errors() {
        let cases: &[(&[u8], &str)] = &[
            (
                b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00ls\x85R.",
                "os.system",
            ),
            (
                b"\x80\x02X\x02\x00\x00\x00osX\x06\x00\x00\x00system\x93)R.",
                "os.system",
            ),
            (b"\x80\x02K\x01)R.", "not a named function"),
            (b"\x80\x02cbuiltins\nlist\n}b.", "BUILD"),
            (b"\x80\x02h\x05.", "memo entry 5"),
            (b"\x80\x02X\xff\xff\xff\xff.", "ends early"),
            (b"\x80\x02t.", "no mark"),
            (b"\x80\x02(.", "mark"),
            (b"\x80\x02.", "empty"),
            (b"\x80\x02K\x01K\x02a.", "not a list"),
            (b"\x80\x02}(K\x01u.", "odd number"),
            (
                b"\x80\x02ccollections\nOrderedDict\nK\x01\x85R.",
                "arguments",
            ),
            (b"\x80\x02\xff.", "unsupported"),
            (b"\x80\x02", "ends early"),
            (
                b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nK\x01R.",
                "not a tuple",
            ),
        ];
        for (bytes, want) in cases {
            let e = format!("{:#}", parse(bytes, &torch_allowed).unwrap_err());
            assert!(e.contains(want), "{bytes:?}: {e}");
        }
        // an allowed call is data, not a call
        let p = parse(
            b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n)R}b.",
            &torch_allowed,
        )
        .unwrap();
        assert!(matches!(p.get(p.root), Object::Call { state: Some(_), .. }));
    }
}
