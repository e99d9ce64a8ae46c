//! Engine tests: a real `GuestMemoryMmap`, `MockSplitQueue` as the driver, a temp image.

use std::sync::Arc;

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempfile::TempFile;

use super::*;
use crate::QueueError;

type Mem = GuestMemoryMmap<()>;

const QSIZE: u16 = 16;
const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;
const MEM_SIZE: usize = 0x10_0000;
const IMG_SECTORS: u64 = 64;

fn mem() -> Mem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

fn image() -> TempFile {
    let f = TempFile::new().unwrap();
    let data: Vec<u8> = (0..IMG_SECTORS * 512)
        .map(|i| (i / 512) as u8 ^ 0x5a)
        .collect();
    std::fs::write(f.as_path(), data).unwrap();
    f
}

/// Drops the image from the page cache, so that reads must wait for the disk.
fn evict(f: &TempFile) {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(f.as_path()).unwrap();
    file.sync_all().unwrap();
    // SAFETY: an advisory call on a file descriptor we own.
    let r = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0);
    // Check with mincore, which (unlike a RWF_NOWAIT read) starts no readahead.
    let len = std::fs::metadata(f.as_path()).unwrap().len() as usize;
    // SAFETY: a new private read-only mapping of a file we own; only passed to mincore and
    // munmap, never dereferenced.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    let mut vec = vec![0u8; len.div_ceil(4096)];
    // SAFETY: `p` maps `len` bytes; `vec` has one byte per page.
    let r = unsafe { libc::mincore(p, len, vec.as_mut_ptr()) };
    // SAFETY: unmapping the mapping made above.
    unsafe { libc::munmap(p, len) };
    assert_eq!(r, 0);
    assert!(
        vec.iter().all(|&v| v & 1 == 0),
        "the image is still cached after POSIX_FADV_DONTNEED"
    );
}

fn disk(f: &TempFile, engine: EngineChoice, readonly: bool, direct: bool) -> Arc<BlockBackend> {
    Arc::new(
        BlockBackend::open(&BlockOptions {
            path: f.as_path().into(),
            readonly,
            direct,
            engine,
            serial: Some("serial-1234".into()),
        })
        .unwrap(),
    )
}

fn d(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
}

fn hdr(m: &Mem, type_: u32, sector: u64) {
    m.write_obj(type_.to_le(), GuestAddress(HDR)).unwrap();
    m.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
    m.write_obj(sector.to_le(), GuestAddress(HDR + 8)).unwrap();
}

/// A standard 3-descriptor request: header, data (writable for IN), status.
fn three(data_len: u32, data_writable: bool) -> Vec<RawDescriptor> {
    let wf = if data_writable { VRING_DESC_F_WRITE } else { 0 };
    vec![
        d(HDR, 16, VRING_DESC_F_NEXT, 1),
        d(DATA, data_len, VRING_DESC_F_NEXT | wf, 2),
        d(STATUS, 1, VRING_DESC_F_WRITE, 0),
    ]
}

struct Run {
    status: u8,
    used_len: u32,
    used_idx: u16,
    outcome: crate::QueueOutcome,
}

/// Puts `descs` in a fresh queue, runs the engine to completion, returns the result.
fn run_with(
    m: &Mem,
    disk: Arc<BlockBackend>,
    descs: &[RawDescriptor],
    setup: impl FnOnce(&MockSplitQueue<Mem>, &mut Queue),
) -> Run {
    m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let vq = MockSplitQueue::new(m, QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    vq.add_desc_chains(descs, 0).unwrap();
    setup(&vq, &mut q);
    let mut bq = BlockQueue::new(disk, m, QSIZE).unwrap();
    let mut outcome = bq.process_queue(&mut q).unwrap();
    outcome.merge(bq.drain(&mut q).unwrap());
    let used_idx = u16::from_le(vq.used().idx().load());
    let elem = vq.used().ring().ref_at(0).unwrap().load();
    Run {
        status: m.read_obj(GuestAddress(STATUS)).unwrap(),
        used_len: elem.len(),
        used_idx,
        outcome,
    }
}

fn run(m: &Mem, disk: Arc<BlockBackend>, descs: &[RawDescriptor]) -> Run {
    run_with(m, disk, descs, |_, _| {})
}

const ENGINES: [EngineChoice; 2] = [EngineChoice::Sync, EngineChoice::IoUring];

fn sector_byte(s: u64) -> u8 {
    s as u8 ^ 0x5a
}

#[test]
fn io_uring_is_available_here() {
    probe_io_uring().unwrap();
    let f = image();
    assert_eq!(
        disk(&f, EngineChoice::Auto, false, false).engine(),
        EngineKind::IoUring
    );
    assert_eq!(
        disk(&f, EngineChoice::Sync, false, false).engine(),
        EngineKind::Sync
    );
}

#[test]
fn read_both_engines() {
    for engine in ENGINES {
        let m = mem();
        let f = image();
        hdr(&m, VIRTIO_BLK_T_IN, 3);
        let r = run(&m, disk(&f, engine, false, false), &three(1024, true));
        assert_eq!(r.status, VIRTIO_BLK_S_OK as u8, "{engine:?}");
        assert_eq!(r.used_len, 1025);
        assert_eq!(r.used_idx, 1);
        assert!(r.outcome.notify);
        let mut buf = vec![0u8; 1024];
        m.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
        assert!(buf[..512].iter().all(|&b| b == sector_byte(3)));
        assert!(buf[512..].iter().all(|&b| b == sector_byte(4)));
    }
}

#[test]
fn write_both_engines_lands_in_image() {
    for engine in ENGINES {
        let m = mem();
        let f = image();
        hdr(&m, VIRTIO_BLK_T_OUT, 10);
        m.write_slice(&[0xc3u8; 1536], GuestAddress(DATA)).unwrap();
        let r = run(&m, disk(&f, engine, false, false), &three(1536, false));
        assert_eq!(r.status, VIRTIO_BLK_S_OK as u8, "{engine:?}");
        assert_eq!(r.used_len, 1);
        let img = std::fs::read(f.as_path()).unwrap();
        assert!(img[10 * 512..13 * 512].iter().all(|&b| b == 0xc3));
        assert!(img[9 * 512..10 * 512].iter().all(|&b| b == sector_byte(9)));
        assert!(img[13 * 512..14 * 512]
            .iter()
            .all(|&b| b == sector_byte(13)));
    }
}

#[test]
fn scattered_buffers_and_split_header() {
    // Header split over two descriptors, data over three, status alone.
    for engine in ENGINES {
        let m = mem();
        let f = image();
        hdr(&m, VIRTIO_BLK_T_IN, 0);
        let w = VRING_DESC_F_WRITE | VRING_DESC_F_NEXT;
        let descs = vec![
            d(HDR, 5, VRING_DESC_F_NEXT, 1),
            d(HDR + 5, 11, VRING_DESC_F_NEXT, 2),
            d(DATA, 100, w, 3),
            d(DATA + 0x1000, 900, w, 4),
            d(DATA + 0x2000, 24, w, 5),
            d(STATUS, 1, VRING_DESC_F_WRITE, 0),
        ];
        let r = run(&m, disk(&f, engine, false, false), &descs);
        assert_eq!(r.status, 0, "{engine:?}");
        assert_eq!(r.used_len, 1025);
        let b: u8 = m.read_obj(GuestAddress(DATA + 0x1000 + 411)).unwrap();
        assert_eq!(b, sector_byte(0));
        let b: u8 = m.read_obj(GuestAddress(DATA + 0x1000 + 412)).unwrap();
        assert_eq!(b, sector_byte(1));
    }
}

#[test]
fn flush_both_engines() {
    for engine in ENGINES {
        let m = mem();
        let f = image();
        hdr(&m, VIRTIO_BLK_T_FLUSH, 0);
        let descs = vec![
            d(HDR, 16, VRING_DESC_F_NEXT, 1),
            d(STATUS, 1, VRING_DESC_F_WRITE, 0),
        ];
        let dk = disk(&f, engine, false, false);
        let r = run(&m, dk, &descs);
        assert_eq!(r.status, VIRTIO_BLK_S_OK as u8, "{engine:?}");
        assert_eq!(r.used_len, 1);
    }
}

#[test]
fn get_id() {
    let m = mem();
    let f = image();
    hdr(&m, VIRTIO_BLK_T_GET_ID, 0);
    let r = run(
        &m,
        disk(&f, EngineChoice::Sync, false, false),
        &three(20, true),
    );
    assert_eq!(r.status, 0);
    assert_eq!(r.used_len, 21);
    let mut id = [0u8; 20];
    m.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..11], b"serial-1234");
    assert!(id[11..].iter().all(|&b| b == 0));
}

fn dwz(m: &Mem, type_: u32, sector: u64, n: u32, flags: u32) -> Vec<RawDescriptor> {
    hdr(m, type_, 0);
    m.write_obj(sector.to_le(), GuestAddress(DATA)).unwrap();
    m.write_obj(n.to_le(), GuestAddress(DATA + 8)).unwrap();
    m.write_obj(flags.to_le(), GuestAddress(DATA + 12)).unwrap();
    three(16, false)
}

#[test]
fn discard_both_engines() {
    for engine in ENGINES {
        let m = mem();
        let f = image();
        let descs = dwz(&m, VIRTIO_BLK_T_DISCARD, 8, 16, 0);
        let r = run(&m, disk(&f, engine, false, false), &descs);
        assert_eq!(r.status, 0, "{engine:?}");
        let img = std::fs::read(f.as_path()).unwrap();
        assert_eq!(img.len() as u64, IMG_SECTORS * 512, "KEEP_SIZE");
        // ext4 punches 4 KiB blocks: sectors 8..24 are block aligned.
        assert!(img[8 * 512..24 * 512].iter().all(|&b| b == 0));
        assert!(img[24 * 512..25 * 512]
            .iter()
            .all(|&b| b == sector_byte(24)));
    }
}

#[test]
fn discard_with_unmap_flag_is_unsupported() {
    let m = mem();
    let f = image();
    let descs = dwz(
        &m,
        VIRTIO_BLK_T_DISCARD,
        8,
        8,
        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    );
    let r = run(&m, disk(&f, EngineChoice::Sync, false, false), &descs);
    assert_eq!(r.status, VIRTIO_BLK_S_UNSUPP as u8);
}

#[test]
fn write_zeroes_both_engines_with_and_without_unmap() {
    for engine in ENGINES {
        for flags in [0, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP] {
            let m = mem();
            let f = image();
            let descs = dwz(&m, VIRTIO_BLK_T_WRITE_ZEROES, 3, 5, flags);
            let r = run(&m, disk(&f, engine, false, false), &descs);
            assert_eq!(r.status, 0, "{engine:?} {flags}");
            let img = std::fs::read(f.as_path()).unwrap();
            assert_eq!(img.len() as u64, IMG_SECTORS * 512);
            assert!(img[2 * 512..3 * 512].iter().all(|&b| b == sector_byte(2)));
            assert!(img[3 * 512..8 * 512].iter().all(|&b| b == 0));
            assert!(img[8 * 512..9 * 512].iter().all(|&b| b == sector_byte(8)));
        }
    }
}

#[test]
fn discard_past_end_is_ioerr() {
    let m = mem();
    let f = image();
    let descs = dwz(&m, VIRTIO_BLK_T_WRITE_ZEROES, IMG_SECTORS - 1, 2, 0);
    let r = run(&m, disk(&f, EngineChoice::Sync, false, false), &descs);
    assert_eq!(r.status, VIRTIO_BLK_S_IOERR as u8);
}

#[test]
fn unknown_type_is_unsupp() {
    let m = mem();
    let f = image();
    hdr(&m, 0x1234, 0);
    let r = run(
        &m,
        disk(&f, EngineChoice::Sync, false, false),
        &three(512, true),
    );
    assert_eq!(r.status, VIRTIO_BLK_S_UNSUPP as u8);
    assert_eq!(r.used_len, 1);
}

#[test]
fn readonly_disk_refuses_writes() {
    for engine in ENGINES {
        let m = mem();
        let f = image();
        let dk = disk(&f, engine, true, false);
        hdr(&m, VIRTIO_BLK_T_OUT, 0);
        m.write_slice(&[0u8; 512], GuestAddress(DATA)).unwrap();
        let r = run(&m, dk.clone(), &three(512, false));
        assert_eq!(r.status, VIRTIO_BLK_S_IOERR as u8);
        let descs = dwz(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0, 1, 0);
        assert_eq!(run(&m, dk.clone(), &descs).status, VIRTIO_BLK_S_IOERR as u8);
        let img = std::fs::read(f.as_path()).unwrap();
        assert!(img[..512].iter().all(|&b| b == sector_byte(0)));
        // Reads still work.
        hdr(&m, VIRTIO_BLK_T_IN, 0);
        assert_eq!(run(&m, dk, &three(512, true)).status, 0);
    }
}

#[test]
fn sectors_past_the_end() {
    let m = mem();
    let f = image();
    let dk = disk(&f, EngineChoice::Sync, false, false);
    hdr(&m, VIRTIO_BLK_T_IN, IMG_SECTORS - 1);
    assert_eq!(
        run(&m, dk.clone(), &three(1024, true)).status,
        VIRTIO_BLK_S_IOERR as u8
    );
    hdr(&m, VIRTIO_BLK_T_IN, u64::MAX);
    assert_eq!(
        run(&m, dk.clone(), &three(512, true)).status,
        VIRTIO_BLK_S_IOERR as u8
    );
    // The last sector is fine.
    hdr(&m, VIRTIO_BLK_T_IN, IMG_SECTORS - 1);
    assert_eq!(run(&m, dk, &three(512, true)).status, 0);
}

#[test]
fn data_not_a_multiple_of_512() {
    let m = mem();
    let f = image();
    hdr(&m, VIRTIO_BLK_T_IN, 0);
    let r = run(
        &m,
        disk(&f, EngineChoice::Sync, false, false),
        &three(100, true),
    );
    assert_eq!(r.status, VIRTIO_BLK_S_IOERR as u8);
}

#[test]
fn header_too_short() {
    let m = mem();
    let f = image();
    hdr(&m, VIRTIO_BLK_T_IN, 0);
    let descs = vec![
        d(HDR, 8, VRING_DESC_F_NEXT, 1),
        d(STATUS, 1, VRING_DESC_F_WRITE, 0),
    ];
    let r = run(&m, disk(&f, EngineChoice::Sync, false, false), &descs);
    assert_eq!(r.status, VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(r.used_len, 1);
}

#[test]
fn status_descriptor_device_readable() {
    let m = mem();
    let f = image();
    hdr(&m, VIRTIO_BLK_T_OUT, 0);
    let descs = vec![
        d(HDR, 16, VRING_DESC_F_NEXT, 1),
        d(DATA, 512, VRING_DESC_F_NEXT, 2),
        d(STATUS, 1, 0, 0),
    ];
    let r = run(&m, disk(&f, EngineChoice::Sync, false, false), &descs);
    // Nowhere to write a status: returned with len 0, guest memory untouched.
    assert_eq!(r.status, 0xff);
    assert_eq!(r.used_len, 0);
    assert_eq!(r.used_idx, 1);
}

#[test]
fn read_with_device_readable_data_buffer() {
    let m = mem();
    let f = image();
    hdr(&m, VIRTIO_BLK_T_IN, 0);
    m.write_slice(&[0x11u8; 512], GuestAddress(DATA)).unwrap();
    let r = run(
        &m,
        disk(&f, EngineChoice::Sync, false, false),
        &three(512, false),
    );
    assert_eq!(r.status, VIRTIO_BLK_S_IOERR as u8);
    let b: u8 = m.read_obj(GuestAddress(DATA)).unwrap();
    assert_eq!(
        b, 0x11,
        "the device must not write a device-readable buffer"
    );
}

#[test]
fn readable_after_writable_descriptor() {
    let m = mem();
    let f = image();
    hdr(&m, VIRTIO_BLK_T_IN, 0);
    let descs = vec![
        d(HDR, 16, VRING_DESC_F_NEXT, 1),
        d(DATA, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2),
        d(DATA + 0x1000, 512, VRING_DESC_F_NEXT, 3),
        d(STATUS, 1, VRING_DESC_F_WRITE, 0),
    ];
    let dk = disk(&f, EngineChoice::Sync, false, false);
    let m2 = &m;
    let vq = MockSplitQueue::new(m2, QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    vq.add_desc_chains(&descs, 0).unwrap();
    let mut bq = BlockQueue::new(dk, m2, QSIZE).unwrap();
    bq.process_queue(&mut q).unwrap();
    assert_eq!(bq.faults(BlkFault::Chain), 1);
    assert_eq!(bq.stats().errors, 1);
}

#[test]
fn descriptor_loop() {
    let m = mem();
    let f = image();
    hdr(&m, VIRTIO_BLK_T_IN, 0);
    // 0 -> 1 -> 2 -> 1 -> 2 ... never ends.
    let descs = vec![
        d(HDR, 16, VRING_DESC_F_NEXT, 1),
        d(DATA, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2),
        d(STATUS, 1, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 1),
    ];
    m.write_slice(&[0xaa; 512], GuestAddress(DATA)).unwrap();
    let r = run(&m, disk(&f, EngineChoice::Sync, false, false), &descs);
    assert_eq!(r.used_idx, 1, "the chain is returned");
    // A chain without an end has no status byte: nothing is written, not even into the
    // writable buffers seen before the walk was cut.
    assert_eq!(r.used_len, 0);
    let last: u8 = m.read_obj(GuestAddress(DATA + 511)).unwrap();
    assert_eq!(last, 0xaa);
}

#[test]
fn next_index_outside_the_table() {
    let m = mem();
    let f = image();
    hdr(&m, VIRTIO_BLK_T_IN, 0);
    let descs = vec![
        d(HDR, 16, VRING_DESC_F_NEXT, 1),
        d(STATUS, 1, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 999),
    ];
    let r = run(&m, disk(&f, EngineChoice::Sync, false, false), &descs);
    assert_eq!(r.used_idx, 1);
    // The chain has no last descriptor, so no known status byte: returned with length 0.
    assert_eq!(r.used_len, 0);
    assert_eq!(r.status, 0xff);
}

/// Writes an indirect table at `table` and returns the head descriptor pointing to it.
fn indirect(m: &Mem, table: u64, descs: &[RawDescriptor]) -> RawDescriptor {
    for (i, desc) in descs.iter().enumerate() {
        m.write_obj(*desc, GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    d(table, 16 * descs.len() as u32, VRING_DESC_F_INDIRECT, 0)
}

#[test]
fn indirect_descriptors_read() {
    for engine in ENGINES {
        let m = mem();
        let f = image();
        hdr(&m, VIRTIO_BLK_T_IN, 5);
        let head = indirect(&m, 0x4_0000, &three(512, true));
        let r = run(&m, disk(&f, engine, false, false), &[head]);
        assert_eq!(r.status, 0, "{engine:?}");
        assert_eq!(r.used_len, 513);
        let b: u8 = m.read_obj(GuestAddress(DATA + 511)).unwrap();
        assert_eq!(b, sector_byte(5));
    }
}

#[test]
fn chain_longer_than_the_queue_within_seg_max_is_served() {
    // seg_max is advertised before the driver picks its queue size: QEMU's vhost-user-blk
    // frontend picks 128 entries while our daemon advertises seg_max 254, and Linux then
    // builds indirect chains longer than the queue. They must be served, not refused (a
    // refusal whose status landed in a data page read as zeros with status OK in a guest).
    for engine in ENGINES {
        let m = mem();
        let f = image();
        hdr(&m, VIRTIO_BLK_T_IN, 3);
        let n = 40usize; // header + 38 data segments + status: longer than QSIZE (16).
        let mut descs = vec![d(HDR, 16, VRING_DESC_F_NEXT, 1)];
        for i in 1..n - 1 {
            descs.push(d(
                DATA + 512 * (i as u64 - 1),
                512,
                VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
                i as u16 + 1,
            ));
        }
        descs.push(d(STATUS, 1, VRING_DESC_F_WRITE, 0));
        let head = indirect(&m, 0x4_0000, &descs);
        let r = run(&m, disk(&f, engine, false, false), &[head]);
        assert_eq!(r.status, 0, "{engine:?}");
        assert_eq!(r.used_len, 38 * 512 + 1, "{engine:?}");
        for s in 0..38u64 {
            let b: u8 = m.read_obj(GuestAddress(DATA + 512 * s + 100)).unwrap();
            assert_eq!(b, sector_byte(3 + s), "{engine:?}: sector {}", 3 + s);
        }
    }
}

#[test]
fn chain_longer_than_any_seg_max_fails_at_its_own_status_byte() {
    let m = mem();
    let f = image();
    hdr(&m, VIRTIO_BLK_T_IN, 0);
    let n = MAX_CHAIN_DESCS + 8;
    let mut descs = vec![d(HDR, 16, VRING_DESC_F_NEXT, 1)];
    for i in 1..n - 1 {
        descs.push(d(
            DATA,
            512,
            VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
            i as u16 + 1,
        ));
    }
    descs.push(d(STATUS, 1, VRING_DESC_F_WRITE, 0));
    let head = indirect(&m, 0x4_0000, &descs);
    m.write_slice(&[0xaa; 512], GuestAddress(DATA)).unwrap();
    let dk = disk(&f, EngineChoice::Sync, false, false);
    let vq = MockSplitQueue::new(&m, QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    vq.add_desc_chains(&[head], 0).unwrap();
    m.write_obj(0u8, GuestAddress(STATUS)).unwrap();
    let mut bq = BlockQueue::new(dk, &m, QSIZE).unwrap();
    let out = bq.process_queue(&mut q).unwrap();
    assert_eq!(out.used, 1);
    assert_eq!(bq.faults(BlkFault::Chain), 1);
    assert_eq!(bq.stats().reads, 0);
    let st: u8 = m.read_obj(GuestAddress(STATUS)).unwrap();
    assert_eq!(
        st, VIRTIO_BLK_S_IOERR as u8,
        "the error is in the real status byte"
    );
    let mut buf = [0u8; 512];
    m.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0xaa),
        "the data buffer is untouched (no status written into it)"
    );
}

#[test]
fn a_fault_mid_chain_writes_the_status_at_the_end_not_into_data() {
    // The second data buffer is outside guest memory: the walk stops recording there, but
    // the status goes to the chain's last descriptor, not to the first data buffer.
    let m = mem();
    let f = image();
    hdr(&m, VIRTIO_BLK_T_IN, 0);
    let descs = vec![
        d(HDR, 16, VRING_DESC_F_NEXT, 1),
        d(DATA, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2),
        d(
            MEM_SIZE as u64 - 256,
            512,
            VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
            3,
        ),
        d(STATUS, 1, VRING_DESC_F_WRITE, 0),
    ];
    m.write_slice(&[0xaa; 512], GuestAddress(DATA)).unwrap();
    let r = run(&m, disk(&f, EngineChoice::Sync, false, false), &descs);
    assert_eq!(r.used_idx, 1);
    assert_eq!(r.status, VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(r.used_len, 1);
    let last: u8 = m.read_obj(GuestAddress(DATA + 511)).unwrap();
    assert_eq!(last, 0xaa, "no status byte written into the data buffer");
}

#[test]
fn buffer_outside_guest_memory() {
    let m = mem();
    let f = image();
    hdr(&m, VIRTIO_BLK_T_IN, 0);
    let descs = vec![
        d(HDR, 16, VRING_DESC_F_NEXT, 1),
        d(
            MEM_SIZE as u64 - 256,
            512,
            VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
            2,
        ),
        d(STATUS, 1, VRING_DESC_F_WRITE, 0),
    ];
    let r = run(&m, disk(&f, EngineChoice::Sync, false, false), &descs);
    assert_eq!(r.used_idx, 1);
    // The walk goes past the bad buffer to the chain's own status byte.
    assert_eq!(r.used_len, 1);
    assert_eq!(r.status, VIRTIO_BLK_S_IOERR as u8);
    // An address that overflows u64.
    let descs = vec![
        d(HDR, 16, VRING_DESC_F_NEXT, 1),
        d(
            u64::MAX - 10,
            512,
            VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
            2,
        ),
        d(STATUS, 1, VRING_DESC_F_WRITE, 0),
    ];
    let r = run(&m, disk(&f, EngineChoice::Sync, false, false), &descs);
    assert_eq!(r.used_idx, 1);
}

#[test]
fn queue_size_validation_and_broken_queues() {
    // virtio-queue refuses sizes that are not powers of two at creation...
    assert!(Queue::new(1000).is_err());
    assert!(Queue::new(0).is_err());
    let mut q = Queue::new(256).unwrap();
    // ...and when the driver writes one (set_size logs and keeps the old size).
    q.set_size(100);
    assert_eq!(q.size(), 256);
    assert!(q.try_set_size(100).is_err());
    assert!(q.try_set_size(512).is_err(), "larger than max_size");

    let f = image();
    let dk = disk(&f, EngineChoice::Sync, false, false);
    let m = mem();
    for bad in [0u16, 1000, 65535] {
        assert!(matches!(
            BlockQueue::new(dk.clone(), &m, bad),
            Err(BlockError::QueueSize(_))
        ));
    }

    // A queue that is not ready: an error, not a panic.
    let mut bq = BlockQueue::new(dk.clone(), &m, QSIZE).unwrap();
    let mut q = Queue::new(QSIZE).unwrap();
    assert!(matches!(
        bq.process_queue(&mut q),
        Err(QueueError::NotReady)
    ));

    // Rings outside guest memory.
    let vq = MockSplitQueue::new(&m, QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    q.set_used_ring_address(Some(MEM_SIZE as u32 - 0x40), Some(0));
    assert!(matches!(
        bq.process_queue(&mut q),
        Err(QueueError::InvalidLayout { .. })
    ));

    // The driver moves avail.idx by more than the queue size.
    let vq = MockSplitQueue::new(&m, QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    vq.avail().idx().store(u16::to_le(QSIZE + 5));
    assert!(matches!(bq.process_queue(&mut q), Err(QueueError::Ring(_))));
}

#[test]
fn event_idx_suppresses_notifications() {
    let m = mem();
    let f = image();
    hdr(&m, VIRTIO_BLK_T_FLUSH, 0);
    let descs = vec![
        d(HDR, 16, VRING_DESC_F_NEXT, 1),
        d(STATUS, 1, VRING_DESC_F_WRITE, 0),
    ];
    let used_event_addr = |vq: &MockSplitQueue<Mem>| vq.avail_addr().0 + 4 + 2 * u64::from(QSIZE);
    // The driver asks for an interrupt only after used index 5: no notification.
    let r = run_with(
        &m,
        disk(&f, EngineChoice::Sync, false, false),
        &descs,
        |vq, q| {
            q.set_event_idx(true);
            m.write_obj(5u16.to_le(), GuestAddress(used_event_addr(vq)))
                .unwrap();
        },
    );
    assert_eq!(r.status, 0);
    assert_eq!(r.outcome.used, 1);
    assert!(!r.outcome.notify);
    // used_event = 0: the first used entry must be signalled.
    let r = run_with(
        &m,
        disk(&f, EngineChoice::Sync, false, false),
        &descs,
        |vq, q| {
            q.set_event_idx(true);
            m.write_obj(0u16, GuestAddress(used_event_addr(vq)))
                .unwrap();
        },
    );
    assert!(r.outcome.notify);
    // With EVENT_IDX the engine also published avail_event (= next_avail) for the driver.
    let vq = MockSplitQueue::new(&m, QSIZE);
    let avail_event: u16 = m
        .read_obj(GuestAddress(vq.used_addr().0 + 4 + 8 * u64::from(QSIZE)))
        .unwrap();
    assert_eq!(u16::from_le(avail_event), 1);
}

#[test]
fn io_uring_completions_through_the_eventfd() {
    // Tried up to 5 times, as the uncached case below: the RWF_NOWAIT attempt's readahead
    // can fill the page before the call returns (seen under load), and the read then
    // completes inline after all.
    for attempt in 1..=5 {
        if uncached_read_completes_through_the_eventfd() {
            return;
        }
        eprintln!("attempt {attempt}: the evicted page was read back within the call");
    }
    panic!("5 times the read completed inline: no read went through io_uring");
}

/// One try of [`io_uring_completions_through_the_eventfd`]: false when the read completed
/// inline (the page was back in the cache), else its checks.
fn uncached_read_completes_through_the_eventfd() -> bool {
    let m = mem();
    let f = image();
    hdr(&m, VIRTIO_BLK_T_IN, 2);
    let vq = MockSplitQueue::new(&m, QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    vq.add_desc_chains(&three(512, true), 0).unwrap();
    let mut bq = BlockQueue::new(disk(&f, EngineChoice::IoUring, false, false), &m, QSIZE).unwrap();
    // Not in the page cache: the read is submitted, not served inline.
    evict(&f);
    let fd = bq.completion_fd().unwrap();
    let out = bq.process_queue(&mut q).unwrap();
    if out.used == 1 {
        return false;
    }
    assert_eq!(out.used, 0, "submitted, not completed");
    assert_eq!(bq.in_flight(), 1);
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, 5000) };
    assert_eq!(n, 1);
    let mut used = 0;
    for _ in 0..100 {
        let out = bq.process_completions(&mut q).unwrap();
        used += out.used;
        if used == 1 {
            assert!(out.notify);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(used, 1);
    assert_eq!(bq.in_flight(), 0);
    let b: u8 = m.read_obj(GuestAddress(DATA)).unwrap();
    assert_eq!(b, sector_byte(2));
    assert_eq!(m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
    true
}

#[test]
fn cached_reads_complete_inline_and_uncached_ones_through_io_uring() {
    let m = mem();
    let f = image();
    // Two segments, so the inline read is a real preadv2 with several iovecs.
    let descs = [
        d(HDR, 16, VRING_DESC_F_NEXT, 1),
        d(DATA, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2),
        d(
            DATA + 0x8000,
            512,
            VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
            3,
        ),
        d(STATUS, 1, VRING_DESC_F_WRITE, 0),
    ];
    // The uncached case is tried up to 5 times: a RWF_NOWAIT read of an evicted page starts
    // its readahead, which on a fast disk can finish before the call returns, and the read
    // then completes from the page cache after all (about 1 run in 10 here).
    let mut uncached_tries = 0;
    let mut cases = std::collections::VecDeque::from([true, false]);
    while let Some(cached) = cases.pop_front() {
        m.write_slice(&[0u8; 512], GuestAddress(DATA)).unwrap();
        m.write_slice(&[0u8; 512], GuestAddress(DATA + 0x8000))
            .unwrap();
        m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        hdr(&m, VIRTIO_BLK_T_IN, 5);
        let vq = MockSplitQueue::new(&m, QSIZE);
        let mut q: Queue = vq.create_queue().unwrap();
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut bq =
            BlockQueue::new(disk(&f, EngineChoice::IoUring, false, false), &m, QSIZE).unwrap();
        if cached {
            // Bring sectors 5-6 into the page cache.
            let mut buf = vec![0u8; 1024];
            std::os::unix::fs::FileExt::read_exact_at(
                &std::fs::File::open(f.as_path()).unwrap(),
                &mut buf,
                5 * 512,
            )
            .unwrap();
        } else {
            evict(&f);
        }
        let out = bq.process_queue(&mut q).unwrap();
        if !cached && out.used == 1 && uncached_tries < 4 {
            uncached_tries += 1;
            cases.push_front(false);
            continue;
        }
        if cached {
            assert_eq!(out.used, 1, "a cached read completes in process_queue");
            assert!(out.notify);
            assert_eq!(bq.in_flight(), 0);
            assert_eq!(bq.stats().cached_reads, 1);
        } else {
            assert_eq!(out.used, 0, "an uncached read is submitted");
            assert_eq!(bq.in_flight(), 1);
            let out = bq.drain(&mut q).unwrap();
            assert_eq!(out.used, 1);
            assert_eq!(bq.stats().cached_reads, 0);
        }
        let used = vq.used().ring().ref_at(0).unwrap().load();
        assert_eq!(used.len(), 1025);
        assert_eq!(m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
        let mut a = [0u8; 512];
        let mut b = [0u8; 512];
        m.read_slice(&mut a, GuestAddress(DATA)).unwrap();
        m.read_slice(&mut b, GuestAddress(DATA + 0x8000)).unwrap();
        assert!(a.iter().all(|&x| x == sector_byte(5)), "cached={cached}");
        assert!(b.iter().all(|&x| x == sector_byte(6)), "cached={cached}");
        let st = bq.stats();
        assert_eq!((st.reads, st.bytes_read, st.errors), (1, 1024, 0));
    }
}

#[test]
fn many_requests_io_uring() {
    // A full queue of reads, in flight together.
    let m = mem();
    let f = image();
    let vq = MockSplitQueue::new(&m, QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    let n = QSIZE / 4;
    let mut descs = Vec::new();
    for i in 0..n {
        let base = 4 * i;
        let h = HDR + 0x100 * u64::from(i);
        m.write_obj(VIRTIO_BLK_T_IN.to_le(), GuestAddress(h))
            .unwrap();
        m.write_obj(u64::from(i).to_le(), GuestAddress(h + 8))
            .unwrap();
        descs.push(d(h, 16, VRING_DESC_F_NEXT, base + 1));
        descs.push(d(
            DATA + 0x1000 * u64::from(i),
            512,
            VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
            base + 2,
        ));
        descs.push(d(STATUS + u64::from(i), 1, VRING_DESC_F_WRITE, 0));
        descs.push(d(0, 0, 0, 0)); // padding, never referenced
    }
    // add_desc_chains starts a new chain after every descriptor without NEXT; drop padding.
    for i in 0..n {
        vq.desc_table().store(4 * i, descs[4 * i as usize]).unwrap();
        vq.desc_table()
            .store(4 * i + 1, descs[4 * i as usize + 1])
            .unwrap();
        vq.desc_table()
            .store(4 * i + 2, descs[4 * i as usize + 2])
            .unwrap();
        vq.avail()
            .ring()
            .ref_at(i as usize)
            .unwrap()
            .store(u16::to_le(4 * i));
    }
    vq.avail().idx().store(u16::to_le(n));
    let mut bq = BlockQueue::new(disk(&f, EngineChoice::IoUring, false, false), &m, QSIZE).unwrap();
    let mut out = bq.process_queue(&mut q).unwrap();
    out.merge(bq.drain(&mut q).unwrap());
    assert_eq!(out.used, u32::from(n));
    for i in 0..n {
        let s: u8 = m.read_obj(GuestAddress(STATUS + u64::from(i))).unwrap();
        assert_eq!(s, 0);
        let b: u8 = m
            .read_obj(GuestAddress(DATA + 0x1000 * u64::from(i)))
            .unwrap();
        assert_eq!(b, sector_byte(u64::from(i)));
    }
    assert_eq!(bq.stats().reads, u64::from(n));
    // The live counters another thread reads: exact once the engine is idle, one latency
    // per request (cached or through io_uring), and they outlive the engine.
    let counters = bq.counters();
    let report = BlockStats::report(0, &counters);
    assert_eq!(report.engine, bq.stats());
    assert_eq!(report.engine.bytes_read, 512 * u64::from(n));
    assert_eq!(report.latency_us.count, u64::from(n));
    assert!(report.latency_us.median.is_some());
    drop(bq);
    // A queue the driver sets up again continues from them.
    let mut again =
        BlockQueue::new(disk(&f, EngineChoice::IoUring, false, false), &m, QSIZE).unwrap();
    again.set_counters(counters.clone());
    assert_eq!(again.stats().reads, u64::from(n));
    assert_eq!(again.latency().count(), u64::from(n));
    counters.kick();
    let json = serde_json::to_value(BlockStats::report(0, &counters)).unwrap();
    assert_eq!(json["reads"], u64::from(n));
    assert_eq!(json["notifications"], 1);
    assert_eq!(json["latency_us"]["count"], u64::from(n));
}

#[test]
fn o_direct_unaligned_buffers_bounce() {
    for engine in ENGINES {
        let m = mem();
        let f = image();
        let dk = disk(&f, engine, false, true);
        assert!(dk.direct());
        // Unaligned guest buffer (DATA + 8): write then read back.
        hdr(&m, VIRTIO_BLK_T_OUT, 4);
        m.write_slice(&[0x77u8; 1024], GuestAddress(DATA + 8))
            .unwrap();
        let descs = vec![
            d(HDR, 16, VRING_DESC_F_NEXT, 1),
            d(DATA + 8, 1024, VRING_DESC_F_NEXT, 2),
            d(STATUS, 1, VRING_DESC_F_WRITE, 0),
        ];
        let r = run(&m, dk.clone(), &descs);
        assert_eq!(r.status, 0, "{engine:?}");
        let img = std::fs::read(f.as_path()).unwrap();
        assert!(img[4 * 512..6 * 512].iter().all(|&b| b == 0x77));

        hdr(&m, VIRTIO_BLK_T_IN, 5);
        let descs = vec![
            d(HDR, 16, VRING_DESC_F_NEXT, 1),
            d(
                DATA + 0x1003,
                512,
                VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
                2,
            ),
            d(STATUS, 1, VRING_DESC_F_WRITE, 0),
        ];
        let r = run(&m, dk.clone(), &descs);
        assert_eq!(r.status, 0);
        let b: u8 = m.read_obj(GuestAddress(DATA + 0x1003 + 511)).unwrap();
        assert_eq!(b, 0x77);

        // Aligned buffers go straight to the file.
        hdr(&m, VIRTIO_BLK_T_IN, 7);
        let r = run(&m, dk, &three(4096, true));
        assert_eq!(r.status, 0);
        let b: u8 = m.read_obj(GuestAddress(DATA)).unwrap();
        assert_eq!(b, sector_byte(7));
    }
}

#[test]
fn works_with_guest_memory_atomic_and_dirty_bitmap() {
    // The vhost-user daemons' memory type: GuestMemoryAtomic over an AtomicBitmap mmap.
    use vm_memory::bitmap::{AtomicBitmap, Bitmap};
    use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryRegion};
    type BMem = GuestMemoryMmap<AtomicBitmap>;
    let bm: BMem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let atomic = GuestMemoryAtomic::new(bm);
    let guard = atomic.memory();
    let f = image();
    guard
        .write_obj(VIRTIO_BLK_T_IN.to_le(), GuestAddress(HDR))
        .unwrap();
    guard
        .write_obj(1u64.to_le(), GuestAddress(HDR + 8))
        .unwrap();
    let vq = MockSplitQueue::new(&*guard, QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    vq.add_desc_chains(&three(512, true), 0).unwrap();
    for engine in ENGINES {
        q.set_next_avail(0);
        let mut bq =
            BlockQueue::new(disk(&f, engine, false, false), atomic.clone(), QSIZE).unwrap();
        bq.process_queue(&mut q).unwrap();
        bq.drain(&mut q).unwrap();
        let b: u8 = guard.read_obj(GuestAddress(DATA)).unwrap();
        assert_eq!(b, sector_byte(1));
        let region = guard.find_region(GuestAddress(DATA)).unwrap();
        assert!(
            region.bitmap().dirty_at(DATA as usize),
            "{engine:?}: DMA marked dirty"
        );
    }
}

/// The ring of the out-of-order crash: head 0 a FLUSH (io_uring, still in flight), head 2 a
/// READ of cached sectors (completes at once on the queue thread).
fn flush_then_cached_read(m: &Mem) -> (MockSplitQueue<'_, Mem>, Queue) {
    let rd_hdr = HDR + 0x100;
    m.write_obj(VIRTIO_BLK_T_FLUSH.to_le(), GuestAddress(HDR))
        .unwrap();
    m.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
    m.write_obj(0u64, GuestAddress(HDR + 8)).unwrap();
    m.write_obj(VIRTIO_BLK_T_IN.to_le(), GuestAddress(rd_hdr))
        .unwrap();
    m.write_obj(0u32, GuestAddress(rd_hdr + 4)).unwrap();
    m.write_obj(7u64.to_le(), GuestAddress(rd_hdr + 8)).unwrap();
    m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    m.write_obj(0xffu8, GuestAddress(STATUS + 1)).unwrap();
    let descs = [
        d(HDR, 16, VRING_DESC_F_NEXT, 1),
        d(STATUS, 1, VRING_DESC_F_WRITE, 0),
        d(rd_hdr, 16, VRING_DESC_F_NEXT, 3),
        d(DATA, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 4),
        d(STATUS + 1, 1, VRING_DESC_F_WRITE, 0),
    ];
    let vq = MockSplitQueue::new(m, QSIZE);
    let q: Queue = vq.create_queue().unwrap();
    vq.add_desc_chains(&descs, 0).unwrap();
    (vq, q)
}

fn used_ids(vq: &MockSplitQueue<'_, Mem>) -> Vec<u32> {
    let n = u16::from_le(vq.used().idx().load());
    (0..n)
        .map(|i| vq.used().ring().ref_at(usize::from(i)).unwrap().load().id())
        .collect()
}

/// The back-end is gone and a new one starts on the same ring, positioned at the used index
/// in guest memory (what the frontend sends in SET_VRING_BASE after a crash).
fn restarted_queue(vq: &MockSplitQueue<'_, Mem>) -> Queue {
    let mut q: Queue = vq.create_queue().unwrap();
    let used = u16::from_le(vq.used().idx().load());
    q.set_next_avail(used);
    q.set_next_used(used);
    q
}

#[test]
fn out_of_order_completion_crash_and_resume_completes_every_head_exactly_once() {
    let f = image();
    let dk = disk(&f, EngineChoice::IoUring, false, false);
    let m = mem();

    // Without an inflight record (the vmm's resume before): the cached READ completed, the
    // FLUSH before it did not, and resuming at the used index serves the READ's ring slot
    // again: head 2 twice, head 0 never.
    let (vq, mut q) = flush_then_cached_read(&m);
    let mut bq = BlockQueue::new(dk.clone(), &m, QSIZE).unwrap();
    let out = bq.process_queue(&mut q).unwrap();
    assert_eq!(out.used, 1, "the cached read completes at once");
    assert_eq!(bq.in_flight(), 1, "the flush is still in io_uring");
    drop(bq); // the crash: the flush's completion is never published
    assert_eq!(used_ids(&vq), vec![2]);
    let mut q = restarted_queue(&vq);
    let mut bq = BlockQueue::new(dk.clone(), &m, QSIZE).unwrap();
    bq.process_queue(&mut q).unwrap();
    bq.drain(&mut q).unwrap();
    assert_eq!(
        used_ids(&vq),
        vec![2, 2],
        "what resuming at the used index alone does"
    );

    // With the inflight record: the restarted engine executes head 0 again and nothing else.
    let m = mem();
    let region = crate::inflight::InflightRegion::create(1, QSIZE).unwrap();
    let (vq, mut q) = flush_then_cached_read(&m);
    let mut bq = BlockQueue::new(dk.clone(), &m, QSIZE).unwrap();
    bq.set_inflight(region.queue(0).unwrap());
    assert!(bq.resume_inflight(&mut q).unwrap().fresh);
    let out = bq.process_queue(&mut q).unwrap();
    assert_eq!(out.used, 1);
    assert_eq!(bq.in_flight(), 1);
    drop(bq);
    assert_eq!(used_ids(&vq), vec![2]);
    let mut q = restarted_queue(&vq);
    let mut bq = BlockQueue::new(dk.clone(), &m, QSIZE).unwrap();
    bq.set_inflight(region.queue(0).unwrap());
    let r = bq.resume_inflight(&mut q).unwrap();
    assert_eq!(r.resubmitted, 1);
    assert!(!r.fresh);
    bq.drain(&mut q).unwrap();
    assert_eq!(used_ids(&vq), vec![2, 0], "every head exactly once");
    let st: u8 = m.read_obj(GuestAddress(STATUS)).unwrap();
    assert_eq!(st, 0, "the flush ran and succeeded");
    // The ring goes on from there: a new request on the restarted queue is served.
    hdr(&m, VIRTIO_BLK_T_IN, 9);
    m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let descs = [
        d(HDR, 16, VRING_DESC_F_NEXT, 6),
        d(DATA, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 7),
        d(STATUS, 1, VRING_DESC_F_WRITE, 0),
    ];
    vq.add_desc_chains(&descs, 5).unwrap();
    bq.process_queue(&mut q).unwrap();
    bq.drain(&mut q).unwrap();
    assert_eq!(used_ids(&vq), vec![2, 0, 5]);
    let b: u8 = m.read_obj(GuestAddress(DATA + 7)).unwrap();
    assert_eq!(b, sector_byte(9));
    assert_eq!(region.queue(0).unwrap().pending(), 0);
}

#[test]
fn many_requests_in_flight_across_two_crashes_complete_exactly_once_in_order_taken() {
    // 8 requests (the mock's rings hold 8 entries without overlapping): reads of cached
    // sectors (they complete at once on the queue thread) between writes of stamped sectors
    // (always through io_uring). The back-end dies before reaping anything, and so does its
    // successor, with the writes executed again in io_uring.
    const N: u64 = 8;
    let f = image();
    let dk = disk(&f, EngineChoice::IoUring, false, false);
    let m = mem();
    let region = crate::inflight::InflightRegion::create(1, QSIZE).unwrap();
    let vq = MockSplitQueue::new(&m, QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    let write = |r: u64| r % 2 == 1;
    for r in 0..N {
        let h = HDR + 0x20 * r;
        let t = if write(r) {
            VIRTIO_BLK_T_OUT
        } else {
            VIRTIO_BLK_T_IN
        };
        m.write_obj(t.to_le(), GuestAddress(h)).unwrap();
        m.write_obj(0u32, GuestAddress(h + 4)).unwrap();
        m.write_obj((8 * r).to_le(), GuestAddress(h + 8)).unwrap();
        m.write_obj(0xffu8, GuestAddress(STATUS + r)).unwrap();
        let wf = if write(r) { 0 } else { VRING_DESC_F_WRITE };
        if write(r) {
            m.write_slice(&[0xa0 + r as u8; 512], GuestAddress(DATA + 512 * r))
                .unwrap();
        }
        let table = [
            d(h, 16, VRING_DESC_F_NEXT, 1),
            d(DATA + 512 * r, 512, VRING_DESC_F_NEXT | wf, 2),
            d(STATUS + r, 1, VRING_DESC_F_WRITE, 0),
        ];
        let head = indirect(&m, 0x5_0000 + 0x100 * r, &table);
        vq.add_desc_chains(&[head], r as u16).unwrap();
    }
    // The whole image in the page cache: every read completes at once.
    std::fs::read(f.as_path()).unwrap();
    let mut bq = BlockQueue::new(dk.clone(), &m, QSIZE).unwrap();
    bq.set_inflight(region.queue(0).unwrap());
    bq.resume_inflight(&mut q).unwrap();
    bq.process_queue(&mut q).unwrap();
    drop(bq);
    let first = used_ids(&vq);
    assert_eq!(
        first.len(),
        N as usize / 2,
        "the cached half completed at once"
    );
    for _ in 0..2 {
        let mut q2 = restarted_queue(&vq);
        let mut bq = BlockQueue::new(dk.clone(), &m, QSIZE).unwrap();
        bq.set_inflight(region.queue(0).unwrap());
        let r = bq.resume_inflight(&mut q2).unwrap();
        assert_eq!(r.resubmitted, N as u32 / 2);
        assert_eq!(r.outcome.used, 0);
        drop(bq);
        assert_eq!(
            used_ids(&vq),
            first,
            "nothing published by the dead back-ends"
        );
    }
    let mut q = restarted_queue(&vq);
    let mut bq = BlockQueue::new(dk.clone(), &m, QSIZE).unwrap();
    bq.set_inflight(region.queue(0).unwrap());
    bq.resume_inflight(&mut q).unwrap();
    bq.drain(&mut q).unwrap();
    let mut ids = used_ids(&vq);
    assert!(ids.starts_with(&first));
    ids.sort_unstable();
    assert_eq!(
        ids,
        (0..N as u32).collect::<Vec<u32>>(),
        "each of the {N} heads once"
    );
    let img = std::fs::read(f.as_path()).unwrap();
    for r in 0..N {
        let st: u8 = m.read_obj(GuestAddress(STATUS + r)).unwrap();
        assert_eq!(st, 0, "request {r}");
        if write(r) {
            let at = (8 * r * 512) as usize;
            assert!(
                img[at..at + 512].iter().all(|&b| b == 0xa0 + r as u8),
                "write {r} is on the image"
            );
        } else {
            let b: u8 = m.read_obj(GuestAddress(DATA + 512 * r + 3)).unwrap();
            assert_eq!(b, sector_byte(8 * r), "request {r} read its own sector");
        }
    }
}

/// A guest whose every request re-arms the ring from the disk: the IN request's data buffers
/// alias the available ring and the request's own header, and sector pair `p` holds the
/// available ring with one more entry (head 0 again) and a header that reads pair `p + 1`.
fn self_arming_ring(m: &Mem, engine: EngineChoice) -> (TempFile, Arc<BlockBackend>, Queue) {
    const AVAIL: u64 = 0x1000;
    const USED: u64 = 0x2000;
    const H: u64 = 0x3000;
    let pairs = 1024u64;
    let f = TempFile::new().unwrap();
    let mut img = vec![0u8; (pairs * 1024) as usize];
    for p in 0..pairs {
        let at = (p * 1024) as usize;
        // Sector 2p: flags 0, idx p + 2, ring[*] = head 0.
        img[at + 2..at + 4].copy_from_slice(&((p + 2) as u16).to_le_bytes());
        // Sector 2p + 1: an IN header for pair p + 1.
        img[at + 512..at + 516].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        img[at + 520..at + 528].copy_from_slice(&(2 * (p + 1)).to_le_bytes());
    }
    std::fs::write(f.as_path(), &img).unwrap();
    let dk = disk(&f, engine, false, false);
    let descs = [
        d(H, 16, VRING_DESC_F_NEXT, 1),
        d(AVAIL, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2),
        d(H, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 3),
        d(STATUS, 1, VRING_DESC_F_WRITE, 0),
    ];
    for (i, desc) in descs.iter().enumerate() {
        m.write_obj(*desc, GuestAddress(16 * i as u64)).unwrap();
    }
    hdr_at(m, H, VIRTIO_BLK_T_IN, 0);
    m.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap();
    m.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
    let mut q = Queue::new(QSIZE).unwrap();
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    (f, dk, q)
}

fn hdr_at(m: &Mem, at: u64, type_: u32, sector: u64) {
    m.write_obj(type_.to_le(), GuestAddress(at)).unwrap();
    m.write_obj(0u32, GuestAddress(at + 4)).unwrap();
    m.write_obj(sector.to_le(), GuestAddress(at + 8)).unwrap();
}

#[test]
fn a_ring_of_huge_requests_done_on_the_queue_thread_is_served_one_call_at_a_time() {
    // A ring of misaligned 40 MiB reads on an O_DIRECT disk, every descriptor on one 1 MiB
    // guest buffer: too large for the bounce budget, each is read piece by piece on the
    // queue thread (the sync engine does every request there). Without a byte budget one
    // call served the whole ring (a ring of 256 MiB requests kept the host away from its
    // event loop for seconds: a reset waited for all of them).
    const MIB: u64 = 1 << 20;
    const BUF: u64 = 0x10_0200;
    const N: u64 = 8;
    const REQ_MIB: u64 = 40;
    for engine in ENGINES {
        let m: Mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let f = TempFile::new().unwrap();
        std::fs::File::create(f.as_path())
            .unwrap()
            .set_len(REQ_MIB * MIB)
            .unwrap();
        let dk = disk(&f, engine, false, true);
        let vq = MockSplitQueue::new(&m, QSIZE);
        let mut q: Queue = vq.create_queue().unwrap();
        for i in 0..N {
            let h = HDR + 0x20 * i;
            hdr_at(&m, h, VIRTIO_BLK_T_IN, 0);
            m.write_obj(0xffu8, GuestAddress(STATUS + i)).unwrap();
            let mut table = vec![d(h, 16, VRING_DESC_F_NEXT, 1)];
            for j in 0..REQ_MIB {
                let flags = VRING_DESC_F_NEXT | VRING_DESC_F_WRITE;
                table.push(d(BUF, MIB as u32, flags, j as u16 + 2));
            }
            table.push(d(STATUS + i, 1, VRING_DESC_F_WRITE, 0));
            let head = indirect(&m, 0x4_0000 + 0x1000 * i, &table);
            vq.add_desc_chains(&[head], i as u16).unwrap();
        }
        let mut bq = BlockQueue::new(dk, &m, QSIZE).unwrap();
        let mut calls = 0;
        loop {
            let out = bq.process_queue(&mut q).unwrap();
            assert!(
                out.used <= 1,
                "{engine:?}: {} requests of {REQ_MIB} MiB in one call (at most {} MiB of them)",
                out.used,
                MAX_SYNC_BYTES_PER_CALL / MIB
            );
            calls += 1;
            if !out.more {
                break;
            }
            assert!(calls <= N + 1, "{engine:?}: 'more' without end");
        }
        assert_eq!(
            used_ids(&vq).len() as u64,
            N,
            "{engine:?}: every request completed"
        );
        for i in 0..N {
            let st: u8 = m.read_obj(GuestAddress(STATUS + i)).unwrap();
            assert_eq!(st, 0, "{engine:?}: request {i}");
        }
        assert!(calls >= N, "{engine:?}: {calls} calls");
    }
}

#[test]
fn a_ring_that_re_arms_itself_from_the_disk_is_served_in_bounded_batches() {
    for engine in ENGINES {
        let m = mem();
        let (_f, dk, mut q) = self_arming_ring(&m, engine);
        let mut bq = BlockQueue::new(dk, &m, QSIZE).unwrap();
        let mut total = 0;
        for round in 0..3 {
            let out = bq.process_queue(&mut q).unwrap();
            let out = if out.used == 0 && bq.in_flight() > 0 {
                // io_uring with an uncached read: completions come through the eventfd.
                let mut o = bq.drain(&mut q).unwrap();
                o.merge(bq.process_queue(&mut q).unwrap());
                o
            } else {
                out
            };
            assert!(
                out.used <= MAX_CHAINS_PER_CALL,
                "{engine:?} round {round}: {} chains in one call",
                out.used
            );
            assert!(
                out.more,
                "{engine:?} round {round}: the ring is still armed"
            );
            total += out.used;
        }
        assert!(total >= 2 * MAX_CHAINS_PER_CALL, "{engine:?}: {total}");
        bq.drain(&mut q).unwrap();
    }
}

#[test]
fn o_direct_bounce_buffers_stay_within_the_queue_budget() {
    // Requests whose 1 MiB descriptors all alias one misaligned 1 MiB guest buffer: 4 of
    // 8 MiB (two fit the budget at once) and one of 32 MiB (larger than all of it).
    const MIB: u64 = 1 << 20;
    const BUF: u64 = 0x10_0001; // misaligned: every byte goes through a bounce buffer
    for engine in ENGINES {
        let m: Mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let f = TempFile::new().unwrap();
        let file = std::fs::File::create(f.as_path()).unwrap();
        file.set_len(64 * MIB).unwrap();
        // Byte `k` at the start of each MiB `k`, so the buffer shows which MiB came last.
        for k in 0..64u64 {
            std::os::unix::fs::FileExt::write_all_at(&file, &[k as u8 + 1; 512], k * MIB).unwrap();
        }
        drop(file);
        let dk = disk(&f, engine, false, true);
        let vq = MockSplitQueue::new(&m, QSIZE);
        let mut q: Queue = vq.create_queue().unwrap();
        // (first MiB, MiBs) of each request.
        let reqs = [(0u64, 8u64), (8, 8), (16, 8), (24, 8), (32, 32)];
        for (i, &(first, n)) in reqs.iter().enumerate() {
            let h = HDR + 0x20 * i as u64;
            hdr_at(&m, h, VIRTIO_BLK_T_IN, first * MIB / 512);
            m.write_obj(0xffu8, GuestAddress(STATUS + i as u64))
                .unwrap();
            let mut table = vec![d(h, 16, VRING_DESC_F_NEXT, 1)];
            for j in 0..n {
                table.push(d(
                    BUF,
                    MIB as u32,
                    VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
                    j as u16 + 2,
                ));
            }
            table.push(d(STATUS + i as u64, 1, VRING_DESC_F_WRITE, 0));
            let head = indirect(&m, 0x4_0000 + 0x1000 * i as u64, &table);
            vq.add_desc_chains(&[head], i as u16).unwrap();
        }
        let mut bq = BlockQueue::new(dk, &m, QSIZE).unwrap();
        let mut more = bq.process_queue(&mut q).unwrap().more;
        assert!(bq.bounce_bytes() <= BOUNCE_BUDGET);
        // As the host does: called again while the engine says 'more' (a call moves at most
        // MAX_SYNC_BYTES_PER_CALL on the thread), completions through the eventfd, which
        // resume popping.
        loop {
            while more {
                more = bq.process_queue(&mut q).unwrap().more;
                assert!(bq.bounce_bytes() <= BOUNCE_BUDGET);
            }
            let Some(fd) = bq.completion_fd().filter(|_| bq.in_flight() > 0) else {
                break;
            };
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            let r = unsafe { libc::poll(&mut p, 1, 10_000) };
            assert!(r > 0, "no completion in 10 s");
            more = bq.process_completions(&mut q).unwrap().more;
            assert!(bq.bounce_bytes() <= BOUNCE_BUDGET);
        }
        assert_eq!(
            used_ids(&vq).len(),
            reqs.len(),
            "{engine:?}: every request completed"
        );
        for i in 0..reqs.len() as u64 {
            let st: u8 = m.read_obj(GuestAddress(STATUS + i)).unwrap();
            assert_eq!(st, 0, "{engine:?}: request {i}");
        }
        assert!(
            bq.bounce_peak() <= BOUNCE_BUDGET,
            "{engine:?}: {} bytes of bounce buffers at once (budget {BOUNCE_BUDGET})",
            bq.bounce_peak()
        );
        if engine == EngineChoice::IoUring {
            assert!(
                bq.bounce_peak() > 0,
                "the 8 MiB requests went through io_uring"
            );
        }
        assert_eq!(bq.bounce_bytes(), 0);
        // The buffer holds the last MiB of the last request to finish (the 32 MiB one: its
        // MiB 63 starts with 64), so the pieces were copied back.
        let b: u8 = m.read_obj(GuestAddress(BUF)).unwrap();
        assert!(b >= 1, "{engine:?}: data reached the guest ({b})");
    }
}

#[test]
fn a_resubmitted_request_that_finds_the_bounce_budget_spent_is_not_pushed_back_to_the_ring() {
    // Positions 0..3 of the ring: A and X (4 MiB reads through misaligned buffers), B (GET_ID,
    // done at once), C (a small misaligned read). A, X and C are in flight when the back-end
    // dies. The guest then makes A 15 MiB: the resumed A leaves too little of the bounce
    // budget for X. Resubmitted requests are not in the ring at the position the engine is
    // at, so X must not be "pushed back" there: that made the next pass take position 3 (C)
    // again, C completed twice and X never.
    const MIB: u64 = 1 << 20;
    const BUF: u64 = 0x10_0001;
    const SMALL: u64 = 0x30_0001;
    let m: Mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    let f = TempFile::new().unwrap();
    std::fs::File::create(f.as_path())
        .unwrap()
        .set_len(32 * MIB)
        .unwrap();
    let dk = disk(&f, EngineChoice::IoUring, false, true);
    let region = crate::inflight::InflightRegion::create(1, QSIZE).unwrap();
    let vq = MockSplitQueue::new(&m, QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    let table_at = |i: u64| 0x4_0000 + 0x1000 * i;
    let read = |i: u64, sector: u64, mibs: u64| {
        let h = HDR + 0x20 * i;
        hdr_at(&m, h, VIRTIO_BLK_T_IN, sector);
        let mut table = vec![d(h, 16, VRING_DESC_F_NEXT, 1)];
        for j in 0..mibs {
            table.push(d(
                BUF,
                MIB as u32,
                VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
                j as u16 + 2,
            ));
        }
        table.push(d(STATUS + i, 1, VRING_DESC_F_WRITE, 0));
        indirect(&m, table_at(i), &table)
    };
    let a = read(0, 0, 4);
    let x = read(1, 8192, 4);
    hdr_at(&m, HDR + 0x40, VIRTIO_BLK_T_GET_ID, 0);
    let b = indirect(
        &m,
        table_at(2),
        &[
            d(HDR + 0x40, 16, VRING_DESC_F_NEXT, 1),
            d(DATA, 20, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2),
            d(STATUS + 2, 1, VRING_DESC_F_WRITE, 0),
        ],
    );
    hdr_at(&m, HDR + 0x60, VIRTIO_BLK_T_IN, 100);
    let c = indirect(
        &m,
        table_at(3),
        &[
            d(HDR + 0x60, 16, VRING_DESC_F_NEXT, 1),
            d(SMALL, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2),
            d(STATUS + 3, 1, VRING_DESC_F_WRITE, 0),
        ],
    );
    for (i, head) in [a, x, b, c].into_iter().enumerate() {
        vq.add_desc_chains(&[head], i as u16).unwrap();
    }
    let mut bq = BlockQueue::new(dk.clone(), &m, QSIZE).unwrap();
    bq.set_inflight(region.queue(0).unwrap());
    bq.resume_inflight(&mut q).unwrap();
    bq.process_queue(&mut q).unwrap();
    assert_eq!(bq.in_flight(), 3, "A, X and C are in flight");
    drop(bq); // the crash
    assert_eq!(used_ids(&vq), vec![2]);

    // A grows to 15 MiB (its indirect table, and the head descriptor that gives its length).
    let a = read(0, 0, 15);
    m.write_obj(a, vq.desc_table_addr()).unwrap();
    let mut q = restarted_queue(&vq);
    let mut bq = BlockQueue::new(dk, &m, QSIZE).unwrap();
    bq.set_inflight(region.queue(0).unwrap());
    let r = bq.resume_inflight(&mut q).unwrap();
    assert_eq!(r.resubmitted, 3);
    bq.drain(&mut q).unwrap();
    bq.process_queue(&mut q).unwrap();
    bq.drain(&mut q).unwrap();
    let mut ids = used_ids(&vq);
    ids.sort_unstable();
    assert_eq!(ids, vec![0, 1, 2, 3], "every head exactly once");
    for i in 0..4 {
        let st: u8 = m.read_obj(GuestAddress(STATUS + i)).unwrap();
        assert_eq!(st, 0, "request {i}");
    }
    assert!(bq.bounce_peak() <= BOUNCE_BUDGET);
    assert_eq!(region.queue(0).unwrap().pending(), 0);
}

/// A ring of chains that each make the engine walk a 16384-entry indirect table (too long:
/// refused, but walked on to the status byte) stops at the descriptor budget, not at the
/// chain budget: 16 of them would be 262144 descriptors in one call.
#[test]
fn long_walks_stop_at_the_descriptor_budget_per_call() {
    use crate::chain::MAX_DESCS_PER_CALL;
    let m = mem();
    let f = image();
    hdr(&m, VIRTIO_BLK_T_IN, 0);
    const N: usize = 16384;
    let mut descs = vec![d(HDR, 16, VRING_DESC_F_NEXT, 1)];
    for i in 1..N - 1 {
        descs.push(d(
            DATA,
            1,
            VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
            i as u16 + 1,
        ));
    }
    descs.push(d(STATUS, 1, VRING_DESC_F_WRITE, 0));
    let head = indirect(&m, 0x4_0000, &descs);
    let vq = MockSplitQueue::new(&m, QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    vq.add_desc_chains(&vec![head; usize::from(QSIZE)], 0)
        .unwrap();
    let mut bq = BlockQueue::new(disk(&f, EngineChoice::Sync, false, false), &m, QSIZE).unwrap();
    let per_call = (MAX_DESCS_PER_CALL as usize).div_ceil(N) as u32;
    let out = bq.process_queue(&mut q).unwrap();
    assert_eq!(out.used, per_call, "chains taken in one call");
    assert!(out.more, "the call says there is more");
    // The rest in the next calls; each refused with IOERR in its status byte.
    let mut total = out.used;
    while total < u32::from(QSIZE) {
        let o = bq.process_queue(&mut q).unwrap();
        assert!(o.used <= per_call && o.used > 0, "{o:?}");
        total += o.used;
    }
    assert_eq!(bq.faults(BlkFault::Chain), u64::from(QSIZE));
    assert_eq!(
        m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        VIRTIO_BLK_S_IOERR as u8
    );
}

/// The engine's rings accept only its own operations on its own (registered) image: an
/// entry outside the restrictions completes with EACCES, and the engine's reads work.
#[test]
fn rings_refuse_operations_outside_their_restrictions() {
    use io_uring::{opcode, types};
    use std::os::fd::AsRawFd;
    let f = image();
    let file = std::fs::File::open(f.as_path()).unwrap();
    let mut ring = super::queue::restricted_ring(8, Some(file.as_raw_fd()), None).unwrap();
    let mut buf = vec![0u8; 512];
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let path = c"/etc/hostname";
    let entries = [
        // Not one of the engine's opcodes.
        opcode::Nop::new().build().user_data(1),
        opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr())
            .build()
            .user_data(2),
        // The engine's opcode, but on an fd instead of the registered image.
        opcode::Readv::new(types::Fd(file.as_raw_fd()), &iov, 1)
            .offset(512)
            .build()
            .user_data(3),
        // What the engine submits: allowed.
        opcode::Readv::new(types::Fixed(0), &iov, 1)
            .offset(512)
            .build()
            .user_data(4),
    ];
    // One at a time: the kernel stops a batch at an entry it refuses.
    let mut res = Vec::new();
    for e in &entries {
        // SAFETY: every entry's buffers (`iov`, `buf`, `path`) outlive the wait below.
        unsafe { ring.submission().push(e).unwrap() };
        ring.submit_and_wait(1).unwrap();
        let c = ring.completion().next().unwrap();
        res.push((c.user_data(), c.result()));
    }
    assert_eq!(
        res,
        vec![
            (1, -libc::EACCES),
            (2, -libc::EACCES),
            (3, -libc::EACCES),
            (4, 512)
        ]
    );
    assert!(buf.iter().all(|&b| b == 1 ^ 0x5a), "sector 1's data");
}
