/* Embeds the flat guest image built by vmm/CMakeLists.txt into libpmlmig_vmm. */
  .section .rodata
  .balign 16
  .global pmlmig_guest_image_begin
pmlmig_guest_image_begin:
  .incbin PMLMIG_GUEST_IMAGE
  .global pmlmig_guest_image_end
pmlmig_guest_image_end:
  .section .note.GNU-stack,"",@progbits
