//! virtio-blk feature bits and the device configuration space.

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use super::disk::{BlockBackend, SECTOR_SIZE};

/// Largest single data segment the guest may use (`size_max`).
pub const SIZE_MAX: u32 = 1 << 20;
/// Largest DISCARD / WRITE_ZEROES range, in sectors (2 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// DISCARD / WRITE_ZEROES segments per request.
pub const MAX_DISCARD_SEG: u32 = 1;
/// Length of the configuration space we expose (through `write_zeroes_may_unmap` + padding).
pub const CONFIG_SPACE_LEN: usize = 60;

/// The most data segments `seg_max` ever advertises.
const SEG_MAX_LIMIT: u32 = 1022;

/// `seg_max` for a queue size: the chain also holds the header and the status descriptors.
pub fn seg_max(queue_size: u16) -> u32 {
    u32::from(queue_size)
        .saturating_sub(2)
        .clamp(1, SEG_MAX_LIMIT)
}

/// The longest descriptor chain the engine accepts, whatever queue size the driver chose:
/// `seg_max` is advertised before the driver picks its queue size (QEMU's vhost-user-blk
/// frontend uses 128 entries by default, our daemon advertises `seg_max` for 256), and
/// Linux builds chains up to `seg_max` + 2 descriptors in an indirect table. Refusing what
/// the config space allowed would fail a well-behaved guest's large reads.
pub const MAX_CHAIN_DESCS: usize = SEG_MAX_LIMIT as usize + 2;

/// The device features offered for `disk` with `num_queues` queues.
pub fn block_features(disk: &BlockBackend, num_queues: u16) -> u64 {
    let mut f = (1u64 << VIRTIO_F_VERSION_1)
        | (1u64 << VIRTIO_RING_F_EVENT_IDX)
        | (1u64 << VIRTIO_RING_F_INDIRECT_DESC)
        | (1u64 << VIRTIO_BLK_F_FLUSH)
        | (1u64 << VIRTIO_BLK_F_BLK_SIZE)
        | (1u64 << VIRTIO_BLK_F_SEG_MAX)
        | (1u64 << VIRTIO_BLK_F_SIZE_MAX);
    if num_queues > 1 {
        f |= 1u64 << VIRTIO_BLK_F_MQ;
    }
    if disk.readonly() {
        f |= 1u64 << VIRTIO_BLK_F_RO;
    } else {
        f |= (1u64 << VIRTIO_BLK_F_DISCARD) | (1u64 << VIRTIO_BLK_F_WRITE_ZEROES);
    }
    f
}

/// `struct virtio_blk_config` (little-endian) for `disk`, `num_queues` queues of
/// `queue_size`. The transport serves reads of any offset/width from these bytes.
pub fn block_config_space(
    disk: &BlockBackend,
    num_queues: u16,
    queue_size: u16,
) -> [u8; CONFIG_SPACE_LEN] {
    let mut c = [0u8; CONFIG_SPACE_LEN];
    let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
    put(0, &disk.capacity_sectors().to_le_bytes()); // capacity
    put(8, &SIZE_MAX.to_le_bytes()); // size_max
    put(12, &seg_max(queue_size).to_le_bytes()); // seg_max
                                                 // 16..20 geometry: not offered.
    put(20, &(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
                                                  // 24 physical_block_exp, 25 alignment_offset, 26 min_io_size, 28 opt_io_size: 0.
                                                  // 32 wce, 33 unused: 0.
    put(34, &num_queues.max(1).to_le_bytes()); // num_queues
    if !disk.readonly() {
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_discard_sectors
        put(40, &MAX_DISCARD_SEG.to_le_bytes()); // max_discard_seg
        put(44, &8u32.to_le_bytes()); // discard_sector_alignment (4 KiB)
        put(48, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        put(52, &MAX_DISCARD_SEG.to_le_bytes()); // max_write_zeroes_seg
        c[56] = 1; // write_zeroes_may_unmap
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{BlockOptions, EngineChoice};
    use std::mem::offset_of;
    use vmm_sys_util::tempfile::TempFile;

    fn disk(readonly: bool) -> (TempFile, BlockBackend) {
        let f = TempFile::new().unwrap();
        f.as_file().set_len(1 << 20).unwrap();
        let d = BlockBackend::open(&BlockOptions {
            path: f.as_path().into(),
            readonly,
            engine: EngineChoice::Sync,
            ..Default::default()
        })
        .unwrap();
        (f, d)
    }

    #[test]
    fn config_layout_matches_virtio_bindings() {
        assert_eq!(offset_of!(virtio_blk_config, capacity), 0);
        assert_eq!(offset_of!(virtio_blk_config, size_max), 8);
        assert_eq!(offset_of!(virtio_blk_config, seg_max), 12);
        assert_eq!(offset_of!(virtio_blk_config, blk_size), 20);
        assert_eq!(offset_of!(virtio_blk_config, num_queues), 34);
        assert_eq!(offset_of!(virtio_blk_config, max_discard_sectors), 36);
        assert_eq!(offset_of!(virtio_blk_config, max_discard_seg), 40);
        assert_eq!(offset_of!(virtio_blk_config, discard_sector_alignment), 44);
        assert_eq!(offset_of!(virtio_blk_config, max_write_zeroes_sectors), 48);
        assert_eq!(offset_of!(virtio_blk_config, max_write_zeroes_seg), 52);
        assert_eq!(offset_of!(virtio_blk_config, write_zeroes_may_unmap), 56);
        assert_eq!(offset_of!(virtio_blk_config, max_secure_erase_sectors), 60);
    }

    #[test]
    fn config_values() {
        let (_f, d) = disk(false);
        let c = block_config_space(&d, 4, 256);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2048);
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), 254);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 4);
        assert_eq!(c[56], 1);
        let f = block_features(&d, 4);
        assert_ne!(f & (1 << VIRTIO_BLK_F_MQ), 0);
        assert_ne!(f & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(f & (1 << VIRTIO_F_VERSION_1), 0);
        assert_ne!(f & (1 << VIRTIO_RING_F_INDIRECT_DESC), 0);
    }

    #[test]
    fn readonly_features() {
        let (_f, d) = disk(true);
        let f = block_features(&d, 1);
        assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_MQ), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
        let c = block_config_space(&d, 1, 128);
        assert_eq!(u32::from_le_bytes(c[36..40].try_into().unwrap()), 0);
    }
}
