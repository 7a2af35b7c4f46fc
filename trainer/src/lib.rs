pub mod device;

pub fn dummy() {}
