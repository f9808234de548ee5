//! Where the printk ring buffer's fields sit: from the kernel's
//! vmcoreinfo (the kernel says so itself, once it is set up), or from the
//! BTF type information in the kernel's own vmlinux (for a kernel that died
//! before it set vmcoreinfo up).

use super::btf::Btf;
use super::vmcoreinfo::Vmcoreinfo;

/// Byte offsets and sizes of the ring buffer's structures (names follow
/// the kernel's: `rb_` printk_ringbuffer, `dr_` prb_desc_ring, `desc_`
/// prb_desc, `lpos_` prb_data_blk_lpos, `info_` printk_info, `data_`
/// prb_data_ring).
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct PrintkLayout {
    pub rb_desc_ring: u64,
    pub rb_text_data_ring: u64,
    pub dr_count_bits: u64,
    pub dr_descs: u64,
    pub dr_infos: u64,
    pub dr_head_id: u64,
    pub dr_tail_id: u64,
    pub desc_size: u64,
    pub desc_state_var: u64,
    pub desc_text_blk_lpos: u64,
    pub lpos_begin: u64,
    pub lpos_next: u64,
    pub info_size: u64,
    pub info_seq: u64,
    pub info_ts_nsec: u64,
    pub info_text_len: u64,
    pub info_caller_id: u64,
    pub data_size_bits: u64,
    pub data_data: u64,
    pub atomic_counter: u64,
}

/// A field the source does not describe.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{source_name} does not describe {what} (a kernel older than 5.10, or not Linux?)")]
pub struct LayoutError {
    /// vmcoreinfo or BTF.
    pub source_name: &'static str,
    /// The field.
    pub what: String,
}

/// Every (struct, member) the decoder needs, in `PrintkLayout` order.
const MEMBERS: [(&str, &str); 18] = [
    ("printk_ringbuffer", "desc_ring"),
    ("printk_ringbuffer", "text_data_ring"),
    ("prb_desc_ring", "count_bits"),
    ("prb_desc_ring", "descs"),
    ("prb_desc_ring", "infos"),
    ("prb_desc_ring", "head_id"),
    ("prb_desc_ring", "tail_id"),
    ("prb_desc", "state_var"),
    ("prb_desc", "text_blk_lpos"),
    ("prb_data_blk_lpos", "begin"),
    ("prb_data_blk_lpos", "next"),
    ("printk_info", "seq"),
    ("printk_info", "ts_nsec"),
    ("printk_info", "text_len"),
    ("printk_info", "caller_id"),
    ("prb_data_ring", "size_bits"),
    ("prb_data_ring", "data"),
    ("atomic64_t", "counter"),
];

impl PrintkLayout {
    fn build(
        source_name: &'static str,
        size: impl Fn(&str) -> Option<u64>,
        offset: impl Fn(&str, &str) -> Option<u64>,
    ) -> Result<Self, LayoutError> {
        let missing = |what: String| LayoutError { source_name, what };
        let mut o = Vec::with_capacity(MEMBERS.len());
        for (s, m) in MEMBERS {
            // atomic_long_t is atomic64_t on 64-bit; vmcoreinfo names it so.
            let found = offset(s, m).or_else(|| {
                (s == "atomic64_t")
                    .then(|| offset("atomic_long_t", m))
                    .flatten()
            });
            o.push(found.ok_or_else(|| missing(format!("{s}.{m}")))?);
        }
        let sz = |t: &str| size(t).ok_or_else(|| missing(format!("the size of {t}")));
        Ok(Self {
            rb_desc_ring: o[0],
            rb_text_data_ring: o[1],
            dr_count_bits: o[2],
            dr_descs: o[3],
            dr_infos: o[4],
            dr_head_id: o[5],
            dr_tail_id: o[6],
            desc_size: sz("prb_desc")?,
            desc_state_var: o[7],
            desc_text_blk_lpos: o[8],
            lpos_begin: o[9],
            lpos_next: o[10],
            info_size: sz("printk_info")?,
            info_seq: o[11],
            info_ts_nsec: o[12],
            info_text_len: o[13],
            info_caller_id: o[14],
            data_size_bits: o[15],
            data_data: o[16],
            atomic_counter: o[17],
        })
    }

    /// From vmcoreinfo's OFFSET() and SIZE() entries.
    pub fn from_vmcoreinfo(v: &Vmcoreinfo) -> Result<Self, LayoutError> {
        Self::build(
            "vmcoreinfo",
            |t| v.size(t),
            |s, m| v.offset(&format!("{s}.{m}")),
        )
    }

    /// From the kernel's BTF.
    pub fn from_btf(b: &Btf) -> Result<Self, LayoutError> {
        Self::build(
            "the kernel's BTF",
            |t| b.struct_size(t),
            |s, m| b.member_offset(s, m),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debian_6_1s_vmcoreinfo_gives_the_layout_the_decoder_tests_use() {
        let text = "SIZE(prb_desc)=24\nSIZE(printk_info)=88\n\
            OFFSET(printk_ringbuffer.desc_ring)=0\nOFFSET(printk_ringbuffer.text_data_ring)=48\n\
            OFFSET(prb_desc_ring.count_bits)=0\nOFFSET(prb_desc_ring.descs)=8\n\
            OFFSET(prb_desc_ring.infos)=16\nOFFSET(prb_desc_ring.head_id)=24\n\
            OFFSET(prb_desc_ring.tail_id)=32\nOFFSET(prb_desc.state_var)=0\n\
            OFFSET(prb_desc.text_blk_lpos)=8\nOFFSET(prb_data_blk_lpos.begin)=0\n\
            OFFSET(prb_data_blk_lpos.next)=8\nOFFSET(printk_info.seq)=0\n\
            OFFSET(printk_info.ts_nsec)=8\nOFFSET(printk_info.text_len)=16\n\
            OFFSET(printk_info.caller_id)=20\nOFFSET(prb_data_ring.size_bits)=0\n\
            OFFSET(prb_data_ring.data)=8\nOFFSET(atomic_long_t.counter)=0\n";
        let v = Vmcoreinfo::from_text(text.as_bytes()).unwrap();
        let l = PrintkLayout::from_vmcoreinfo(&v).unwrap();
        assert_eq!(l, super::super::printk::synth::layout());
        let partial = Vmcoreinfo::from_text(b"SIZE(prb_desc)=24\n").unwrap();
        let e = PrintkLayout::from_vmcoreinfo(&partial).unwrap_err();
        assert!(e.to_string().contains("printk_ringbuffer.desc_ring"), "{e}");
    }
}
