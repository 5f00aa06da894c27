"""The AUTOMATIC1111 WebUI adapter: the only part of lib_magicfusion that imports `modules`."""
