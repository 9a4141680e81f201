# The sources and compiler flags of cmake/sources.json (the list setup.py reads too), for CMake:
#
#   pyfastnn_add_library(<target>)
#
# builds the shared library <target> from the C++ sources (without the Python module) and the CPU
# kernels compiled once per CPU capability, each copy an OBJECT library with that capability's flags,
# linked after every other object: NOTE [ Linking AVX and non-AVX files ] in csrc/cpu/dispatch.cpp.
# Sets PYFASTNN_CPU_CAPABILITIES to the capabilities built.
#
#   pyfastnn_target_warnings(<target>)
#
# compiles <target> (the library's objects, its tests) with the warning flags of sources.json.
include_guard(GLOBAL)

set(PYFASTNN_SOURCES_JSON "${CMAKE_CURRENT_LIST_DIR}/sources.json")
set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS "${PYFASTNN_SOURCES_JSON}")
file(READ "${PYFASTNN_SOURCES_JSON}" _pyfastnn_json)

# <out> = the JSON array of strings at the path given by the remaining arguments, as a CMake list.
function(_pyfastnn_json_list out)
  string(JSON _length LENGTH "${_pyfastnn_json}" ${ARGN})
  set(_items "")
  if(_length GREATER 0)
    math(EXPR _last "${_length} - 1")
    foreach(_i RANGE ${_last})
      string(JSON _item GET "${_pyfastnn_json}" ${ARGN} ${_i})
      list(APPEND _items "${_item}")
    endforeach()
  endif()
  set(${out} "${_items}" PARENT_SCOPE)
endfunction()

# <out> = the repository files matching the JSON list of globs at the path given by ARGN.
function(_pyfastnn_json_sources out)
  _pyfastnn_json_list(_patterns ${ARGN})
  set(_files "")
  foreach(_pattern IN LISTS _patterns)
    file(GLOB _matched CONFIGURE_DEPENDS "${PROJECT_SOURCE_DIR}/${_pattern}")
    list(APPEND _files ${_matched})
  endforeach()
  list(REMOVE_DUPLICATES _files)
  list(SORT _files)
  set(${out} "${_files}" PARENT_SCOPE)
endfunction()

# <out> = whether the torch found runs its intra-op threads on OpenMP (ATen/Config.h says so).
function(_pyfastnn_torch_uses_openmp out)
  set(_uses FALSE)
  foreach(_dir IN LISTS TORCH_INCLUDE_DIRS)
    if(EXISTS "${_dir}/ATen/Config.h")
      file(STRINGS "${_dir}/ATen/Config.h" _line REGEX "^#define AT_PARALLEL_OPENMP 1")
      if(_line)
        set(_uses TRUE)
      endif()
    endif()
  endforeach()
  set(${out} ${_uses} PARENT_SCOPE)
endfunction()

function(pyfastnn_target_warnings target)
  _pyfastnn_json_list(_cxx_flags cxx_flags)
  _pyfastnn_json_list(_gcc_cxx_flags gcc_cxx_flags)
  target_compile_options(${target} PRIVATE ${_cxx_flags} "$<$<CXX_COMPILER_ID:GNU>:${_gcc_cxx_flags}>")
endfunction()

function(pyfastnn_add_library target)
  _pyfastnn_json_sources(_sources cxx_sources)
  _pyfastnn_json_sources(_python_sources python_module_sources)
  _pyfastnn_json_sources(_kernel_sources cpu_kernels)
  list(REMOVE_ITEM _sources ${_python_sources} ${_kernel_sources})
  string(JSON _define_prefix GET "${_pyfastnn_json}" cpu_capability_define)
  set(_is_gcc "$<CXX_COMPILER_ID:GNU>")
  # at::parallel_for is an OpenMP loop only when compiled with OpenMP; it must run on the libgomp
  # torch loads (the one torch ships, else the compiler's), never a second runtime (sources.json).
  _pyfastnn_json_list(_gcc_openmp_flags gcc_openmp_flags)
  _pyfastnn_torch_uses_openmp(_torch_openmp)
  set(_openmp "")
  set(_openmp_link "")
  if(_torch_openmp AND CMAKE_SYSTEM_NAME STREQUAL "Linux")
    set(_openmp "$<${_is_gcc}:${_gcc_openmp_flags}>")
    file(GLOB _torch_libgomp "${TORCH_INSTALL_PREFIX}/lib/libgomp*.so*")
    if(_torch_libgomp)
      list(GET _torch_libgomp 0 _torch_libgomp)
      set(_openmp_link "$<${_is_gcc}:${_torch_libgomp}>")
    else()
      set(_openmp_link "$<${_is_gcc}:${_gcc_openmp_flags}>")
    endif()
  endif()

  if(CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64|amd64)$")
    set(_x86_64 TRUE)
  else()
    set(_x86_64 FALSE)
  endif()

  set(_capabilities "")
  set(_kernel_objects "")
  string(JSON _count LENGTH "${_pyfastnn_json}" cpu_capabilities)
  math(EXPR _last "${_count} - 1")
  foreach(_i RANGE ${_last})
    string(JSON _name GET "${_pyfastnn_json}" cpu_capabilities ${_i} name)
    string(JSON _x86_64_only GET "${_pyfastnn_json}" cpu_capabilities ${_i} x86_64_only)
    if(_x86_64_only AND NOT _x86_64)
      continue()
    endif()
    _pyfastnn_json_list(_flags cpu_capabilities ${_i} flags)
    _pyfastnn_json_list(_gcc_flags cpu_capabilities ${_i} gcc_flags)
    set(_objects ${target}_cpu_${_name})
    add_library(${_objects} OBJECT ${_kernel_sources})
    set_target_properties(${_objects} PROPERTIES POSITION_INDEPENDENT_CODE ON)
    target_include_directories(${_objects} PRIVATE "${PROJECT_SOURCE_DIR}/csrc")
    target_link_libraries(${_objects} PRIVATE torch)
    pyfastnn_target_warnings(${_objects})
    target_compile_options(${_objects} PRIVATE ${_openmp} ${_flags} "$<${_is_gcc}:${_gcc_flags}>")
    list(APPEND _capabilities ${_name})
    list(APPEND _kernel_objects "$<TARGET_OBJECTS:${_objects}>")
  endforeach()

  # The kernel objects come after every other source: the linker keeps the first copy it sees of an
  # inline function emitted in several objects, and that must be a copy without AVX instructions.
  add_library(${target} SHARED ${_sources} ${_kernel_objects})
  target_include_directories(${target} PUBLIC "${PROJECT_SOURCE_DIR}/csrc")
  target_link_libraries(${target} PUBLIC ${TORCH_LIBRARIES})
  pyfastnn_target_warnings(${target})
  target_compile_options(${target} PRIVATE ${_openmp})
  target_link_libraries(${target} PRIVATE ${_openmp_link})  # after the objects: --as-needed keeps it
  # Loading the library registers the ops, and a program may reach them only through the dispatcher
  # (TorchScript, findSchema): an --as-needed linker would drop it as unused. Its users link it
  # --no-as-needed, as torch's CMake config does for torch_cpu.
  if(CMAKE_SYSTEM_NAME STREQUAL "Linux")
    target_link_libraries(${target} INTERFACE "-Wl,--no-as-needed,\"$<TARGET_FILE:${target}>\" -Wl,--as-needed")
  endif()
  foreach(_name IN LISTS _capabilities)
    target_compile_definitions(${target} PRIVATE ${_define_prefix}${_name})
  endforeach()
  set(PYFASTNN_CPU_CAPABILITIES "${_capabilities}" PARENT_SCOPE)
endfunction()

# A ctest that checks NOTE [ Linking AVX and non-AVX files ] on <target>'s kernel objects.
function(pyfastnn_add_kernel_object_test target)
  list(LENGTH PYFASTNN_CPU_CAPABILITIES _count)
  if(_count LESS 2 OR NOT CMAKE_NM)
    return()
  endif()
  # Each capability has one object per kernel source: "|" separates them (";" separates capabilities).
  set(_objects "")
  foreach(_name IN LISTS PYFASTNN_CPU_CAPABILITIES)
    if(NOT _name STREQUAL "DEFAULT")
      list(APPEND _objects "${_name}=$<JOIN:$<TARGET_OBJECTS:${target}_cpu_${_name}>,|>")
    endif()
  endforeach()
  add_test(NAME ${target}_kernel_objects
           COMMAND ${CMAKE_COMMAND} -DNM=${CMAKE_NM}
                   "-DDEFAULT_OBJECTS=$<JOIN:$<TARGET_OBJECTS:${target}_cpu_DEFAULT>,|>"
                   "-DOBJECTS=${_objects}" -P "${PROJECT_SOURCE_DIR}/cmake/CheckKernelObjects.cmake")
endfunction()
