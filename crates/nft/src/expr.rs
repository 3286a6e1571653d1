//! nf_tables expressions: the few we emit, encoded to and decoded from their
//! netlink attributes (linux/netfilter/nf_tables.h), plus an `nft`-style
//! rendering for humans.

use crate::netlink::{Attrs, MsgBuf, attr, be32, cstr};

// enum nft_registers: 16-byte registers; REG_1 holds up to an IPv6 address.
pub const REG_VERDICT: u32 = 0;
pub const REG_1: u32 = 1;
pub const REG_2: u32 = 2;

// enum nft_verdicts and netfilter verdicts.
pub const NF_ACCEPT: i32 = 1;
pub const NFT_JUMP: i32 = -3;
pub const NFT_RETURN: i32 = -5;

// enum nft_meta_keys
pub const META_MARK: u32 = 3;
pub const META_IIF: u32 = 4;
pub const META_SKUID: u32 = 10;
pub const META_SKGID: u32 = 11;
pub const META_NFPROTO: u32 = 15;
pub const META_L4PROTO: u32 = 16;

// enum nft_ct_keys; IP_CT_DIR_ORIGINAL
pub const CT_DIRECTION: u32 = 1;
pub const CT_DIR_ORIGINAL: u8 = 0;

// enum nft_payload_bases
pub const PAYLOAD_NETWORK: u32 = 1;
pub const PAYLOAD_TRANSPORT: u32 = 2;

// enum nft_cmp_ops
pub const CMP_EQ: u32 = 0;
pub const CMP_NEQ: u32 = 1;

pub const LOOKUP_F_INV: u32 = 1;
pub const NAT_DNAT: u32 = 1;

pub const NFPROTO_UNSPEC: u32 = 0;
pub const NFPROTO_IPV4: u8 = 2;
pub const NFPROTO_IPV6: u8 = 10;

// Attribute numbers, per expression (enum nft_*_attributes).
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFTA_LOOKUP_SET: u16 = 1;
const NFTA_LOOKUP_SREG: u16 = 2;
const NFTA_LOOKUP_SET_ID: u16 = 4;
const NFTA_LOOKUP_FLAGS: u16 = 5;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFTA_BITWISE_SREG: u16 = 1;
const NFTA_BITWISE_DREG: u16 = 2;
const NFTA_BITWISE_LEN: u16 = 3;
const NFTA_BITWISE_MASK: u16 = 4;
const NFTA_BITWISE_XOR: u16 = 5;
const NFTA_CT_DREG: u16 = 1;
const NFTA_CT_KEY: u16 = 2;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFTA_META_SREG: u16 = 3;
const NFTA_NAT_TYPE: u16 = 1;
const NFTA_NAT_FAMILY: u16 = 2;
const NFTA_NAT_REG_ADDR_MIN: u16 = 3;
const NFTA_NAT_REG_PROTO_MIN: u16 = 5;
const NFTA_TPROXY_FAMILY: u16 = 1;
const NFTA_TPROXY_REG_PORT: u16 = 3;
const NFTA_REDIR_REG_PROTO_MIN: u16 = 1;

/// The value an `immediate` loads: bytes, or a verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data {
    Value(Vec<u8>),
    Verdict { code: i32, chain: Option<String> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    /// Load a meta key into a register.
    Meta {
        key: u32,
        dreg: u32,
    },
    /// Load a conntrack key into a register.
    Ct {
        key: u32,
        dreg: u32,
    },
    /// Set a meta key (the mark) from a register.
    MetaSet {
        key: u32,
        sreg: u32,
    },
    Payload {
        base: u32,
        offset: u32,
        len: u32,
        dreg: u32,
    },
    Cmp {
        sreg: u32,
        op: u32,
        data: Vec<u8>,
    },
    /// `reg = (reg & mask) ^ xor`; we use it to mask addresses to a prefix.
    Bitwise {
        reg: u32,
        mask: Vec<u8>,
        xor: Vec<u8>,
    },
    Lookup {
        set: String,
        set_id: Option<u32>,
        sreg: u32,
        invert: bool,
    },
    Immediate {
        dreg: u32,
        data: Data,
    },
    Redir {
        reg_port: u32,
    },
    Dnat {
        family: u32,
        reg_addr: u32,
        reg_port: u32,
    },
    Tproxy {
        reg_port: u32,
    },
    Counter,
    /// Anything else the kernel reports (never emitted by us).
    Other(String),
}

impl Expr {
    fn name(&self) -> &str {
        match self {
            Self::Meta { .. } | Self::MetaSet { .. } => "meta",
            Self::Payload { .. } => "payload",
            Self::Ct { .. } => "ct",
            Self::Cmp { .. } => "cmp",
            Self::Bitwise { .. } => "bitwise",
            Self::Lookup { .. } => "lookup",
            Self::Immediate { .. } => "immediate",
            Self::Redir { .. } => "redir",
            Self::Dnat { .. } => "nat",
            Self::Tproxy { .. } => "tproxy",
            Self::Counter => "counter",
            Self::Other(name) => name,
        }
    }

    pub fn encode(&self, m: &mut MsgBuf) {
        let elem = m.nest_begin(NFTA_LIST_ELEM);
        m.attr_str(NFTA_EXPR_NAME, self.name());
        let data = m.nest_begin(NFTA_EXPR_DATA);
        match self {
            Self::Meta { key, dreg } => {
                m.attr_be32(NFTA_META_KEY, *key);
                m.attr_be32(NFTA_META_DREG, *dreg);
            }
            Self::Ct { key, dreg } => {
                m.attr_be32(NFTA_CT_KEY, *key);
                m.attr_be32(NFTA_CT_DREG, *dreg);
            }
            Self::MetaSet { key, sreg } => {
                m.attr_be32(NFTA_META_KEY, *key);
                m.attr_be32(NFTA_META_SREG, *sreg);
            }
            Self::Payload {
                base,
                offset,
                len,
                dreg,
            } => {
                m.attr_be32(NFTA_PAYLOAD_DREG, *dreg);
                m.attr_be32(NFTA_PAYLOAD_BASE, *base);
                m.attr_be32(NFTA_PAYLOAD_OFFSET, *offset);
                m.attr_be32(NFTA_PAYLOAD_LEN, *len);
            }
            Self::Cmp { sreg, op, data } => {
                m.attr_be32(NFTA_CMP_SREG, *sreg);
                m.attr_be32(NFTA_CMP_OP, *op);
                let d = m.nest_begin(NFTA_CMP_DATA);
                m.attr(NFTA_DATA_VALUE, data);
                m.nest_end(d);
            }
            Self::Bitwise { reg, mask, xor } => {
                m.attr_be32(NFTA_BITWISE_SREG, *reg);
                m.attr_be32(NFTA_BITWISE_DREG, *reg);
                m.attr_be32(NFTA_BITWISE_LEN, mask.len() as u32);
                let d = m.nest_begin(NFTA_BITWISE_MASK);
                m.attr(NFTA_DATA_VALUE, mask);
                m.nest_end(d);
                let d = m.nest_begin(NFTA_BITWISE_XOR);
                m.attr(NFTA_DATA_VALUE, xor);
                m.nest_end(d);
            }
            Self::Lookup {
                set,
                set_id,
                sreg,
                invert,
            } => {
                m.attr_str(NFTA_LOOKUP_SET, set);
                if let Some(id) = set_id {
                    m.attr_be32(NFTA_LOOKUP_SET_ID, *id);
                }
                m.attr_be32(NFTA_LOOKUP_SREG, *sreg);
                if *invert {
                    m.attr_be32(NFTA_LOOKUP_FLAGS, LOOKUP_F_INV);
                }
            }
            Self::Immediate { dreg, data } => {
                m.attr_be32(NFTA_IMMEDIATE_DREG, *dreg);
                let d = m.nest_begin(NFTA_IMMEDIATE_DATA);
                match data {
                    Data::Value(v) => m.attr(NFTA_DATA_VALUE, v),
                    Data::Verdict { code, chain } => {
                        let v = m.nest_begin(NFTA_DATA_VERDICT);
                        m.attr_be32(NFTA_VERDICT_CODE, *code as u32);
                        if let Some(chain) = chain {
                            m.attr_str(NFTA_VERDICT_CHAIN, chain);
                        }
                        m.nest_end(v);
                    }
                }
                m.nest_end(d);
            }
            Self::Redir { reg_port } => m.attr_be32(NFTA_REDIR_REG_PROTO_MIN, *reg_port),
            Self::Dnat {
                family,
                reg_addr,
                reg_port,
            } => {
                m.attr_be32(NFTA_NAT_TYPE, NAT_DNAT);
                m.attr_be32(NFTA_NAT_FAMILY, *family);
                m.attr_be32(NFTA_NAT_REG_ADDR_MIN, *reg_addr);
                m.attr_be32(NFTA_NAT_REG_PROTO_MIN, *reg_port);
            }
            Self::Tproxy { reg_port } => {
                // NFPROTO_UNSPEC with no address: valid for both families
                // of an inet table (the kernel enables both defrag modules).
                m.attr_be32(NFTA_TPROXY_FAMILY, NFPROTO_UNSPEC);
                m.attr_be32(NFTA_TPROXY_REG_PORT, *reg_port);
            }
            Self::Counter | Self::Other(_) => {}
        }
        m.nest_end(data);
        m.nest_end(elem);
    }

    /// Decodes one NFTA_LIST_ELEM payload.
    pub fn decode(elem: &[u8]) -> Expr {
        let name = attr(elem, NFTA_EXPR_NAME).map(cstr).unwrap_or_default();
        let d = attr(elem, NFTA_EXPR_DATA).unwrap_or(&[]);
        let u = |ty: u16| attr(d, ty).and_then(be32);
        let decoded = match name.as_str() {
            "meta" => match (u(NFTA_META_KEY), u(NFTA_META_DREG), u(NFTA_META_SREG)) {
                (Some(key), Some(dreg), _) => Some(Self::Meta { key, dreg }),
                (Some(key), None, Some(sreg)) => Some(Self::MetaSet { key, sreg }),
                _ => None,
            },
            "ct" => match (u(NFTA_CT_KEY), u(NFTA_CT_DREG)) {
                (Some(key), Some(dreg)) => Some(Self::Ct { key, dreg }),
                _ => None,
            },
            "payload" => Some(Self::Payload {
                base: u(NFTA_PAYLOAD_BASE).unwrap_or(0),
                offset: u(NFTA_PAYLOAD_OFFSET).unwrap_or(0),
                len: u(NFTA_PAYLOAD_LEN).unwrap_or(0),
                dreg: u(NFTA_PAYLOAD_DREG).unwrap_or(0),
            }),
            "cmp" => Some(Self::Cmp {
                sreg: u(NFTA_CMP_SREG).unwrap_or(0),
                op: u(NFTA_CMP_OP).unwrap_or(0),
                data: attr(d, NFTA_CMP_DATA)
                    .and_then(|v| attr(v, NFTA_DATA_VALUE))
                    .unwrap_or(&[])
                    .to_vec(),
            }),
            "bitwise" => {
                let value = |ty| {
                    attr(d, ty)
                        .and_then(|v| attr(v, NFTA_DATA_VALUE))
                        .map(<[u8]>::to_vec)
                };
                Some(Self::Bitwise {
                    reg: u(NFTA_BITWISE_DREG).unwrap_or(0),
                    mask: value(NFTA_BITWISE_MASK).unwrap_or_default(),
                    xor: value(NFTA_BITWISE_XOR).unwrap_or_default(),
                })
            }
            "lookup" => Some(Self::Lookup {
                set: attr(d, NFTA_LOOKUP_SET).map(cstr).unwrap_or_default(),
                set_id: None,
                sreg: u(NFTA_LOOKUP_SREG).unwrap_or(0),
                invert: u(NFTA_LOOKUP_FLAGS).unwrap_or(0) & LOOKUP_F_INV != 0,
            }),
            "immediate" => {
                let data = attr(d, NFTA_IMMEDIATE_DATA).unwrap_or(&[]);
                let data = if let Some(v) = attr(data, NFTA_DATA_VERDICT) {
                    Data::Verdict {
                        code: attr(v, NFTA_VERDICT_CODE).and_then(be32).unwrap_or(0) as i32,
                        chain: attr(v, NFTA_VERDICT_CHAIN).map(cstr),
                    }
                } else {
                    Data::Value(attr(data, NFTA_DATA_VALUE).unwrap_or(&[]).to_vec())
                };
                Some(Self::Immediate {
                    dreg: u(NFTA_IMMEDIATE_DREG).unwrap_or(0),
                    data,
                })
            }
            "redir" => Some(Self::Redir {
                reg_port: u(NFTA_REDIR_REG_PROTO_MIN).unwrap_or(0),
            }),
            "nat" if u(NFTA_NAT_TYPE) == Some(NAT_DNAT) => Some(Self::Dnat {
                family: u(NFTA_NAT_FAMILY).unwrap_or(0),
                reg_addr: u(NFTA_NAT_REG_ADDR_MIN).unwrap_or(0),
                reg_port: u(NFTA_NAT_REG_PROTO_MIN).unwrap_or(0),
            }),
            "tproxy" => Some(Self::Tproxy {
                reg_port: u(NFTA_TPROXY_REG_PORT).unwrap_or(0),
            }),
            "counter" => Some(Self::Counter),
            _ => None,
        };
        decoded.unwrap_or(Self::Other(name))
    }
}

/// Decodes an NFTA_RULE_EXPRESSIONS payload.
pub fn decode_list(list: &[u8]) -> Vec<Expr> {
    Attrs::new(list)
        .filter(|(ty, _)| *ty == NFTA_LIST_ELEM)
        .map(|(_, e)| Expr::decode(e))
        .collect()
}

// Short constructors for the rule builder.

pub fn meta(key: u32) -> Expr {
    Expr::Meta { key, dreg: REG_1 }
}

pub fn cmp(op: u32, data: impl Into<Vec<u8>>) -> Expr {
    Expr::Cmp {
        sreg: REG_1,
        op,
        data: data.into(),
    }
}

pub fn payload(base: u32, offset: u32, len: u32) -> Expr {
    Expr::Payload {
        base,
        offset,
        len,
        dreg: REG_1,
    }
}

/// Masks REG_1 (holding an address of `bytes` bytes) to its first `prefix` bits.
pub fn prefix_mask(bytes: usize, prefix: u8) -> Expr {
    let mut mask = vec![0u8; bytes];
    for (i, b) in mask.iter_mut().enumerate() {
        let bits = (prefix as usize).saturating_sub(i * 8).min(8);
        *b = if bits == 0 { 0 } else { 0xffu8 << (8 - bits) };
    }
    Expr::Bitwise {
        reg: REG_1,
        mask,
        xor: vec![0; bytes],
    }
}

pub fn lookup(set: &str, set_id: u32, invert: bool) -> Expr {
    Expr::Lookup {
        set: set.to_owned(),
        set_id: Some(set_id),
        sreg: REG_1,
        invert,
    }
}

pub fn load(dreg: u32, value: impl Into<Vec<u8>>) -> Expr {
    Expr::Immediate {
        dreg,
        data: Data::Value(value.into()),
    }
}

pub fn verdict(code: i32, chain: Option<&str>) -> Expr {
    Expr::Immediate {
        dreg: REG_VERDICT,
        data: Data::Verdict {
            code,
            chain: chain.map(str::to_owned),
        },
    }
}
