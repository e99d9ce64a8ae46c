//! Prints the path of the ring-3 PVH test guest built by this package (for scripts).

fn main() {
    println!("{}", tests::guest::test_guest_elf().display());
}
