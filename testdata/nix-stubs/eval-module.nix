# A tiny module evaluator for the stubs: calls a NixOS-style module with the
# final config (a lazy fixpoint, as the module system does), fills in option
# defaults, checks values against option types (attrsOf, submodule with its
# name, listOf, nullOr and the leaf types in ./lib.nix), rejects undeclared
# options, and resolves mkIf/mkMerge in the module's config section.
{ lib, module, pkgs, userConfig, outside ? { }, utils ? { } }:
let
  b = builtins;
  isOption = o: b.isAttrs o && (o._type or null) == "option";

  check = path: t: name: x:
    if t ? attrsOf then
      (if b.isAttrs x then b.mapAttrs (n: check "${path}.${n}" t.attrsOf n) x else b.throw "${path}: want an attribute set")
    else if t ? submodule then fill path ((t.submodule { inherit name; }).options) x
    else if t ? listOf then
      (if b.isList x then map (check "${path}[]" t.listOf name) x else b.throw "${path}: want a list")
    else if t ? nullOr then (if x == null then null else check path t.nullOr name x)
    else if t.check x then x
    else b.throw "${path}: ${b.toJSON x} is not a ${t.name}";

  fill = path: opts: val:
    let
      unknown = b.filter (n: !(opts ? ${n})) (b.attrNames val);
      filled = b.mapAttrs
        (n: o:
          let p = "${path}.${n}"; in
          if isOption o then
            check p o.type n (if val ? ${n} then val.${n} else if o ? default then o.default else b.throw "${p} is used but not defined")
          else fill p o (val.${n} or { }))
        opts;
    in
    if unknown != [ ] then b.throw "${path}: undeclared options ${toString unknown}" else filled;

  resolve = x:
    if b.isAttrs x && (x._type or null) == "if" then (if x.condition then resolve x.content else { })
    else if b.isAttrs x && (x._type or null) == "merge" then b.foldl' (a: c: a // resolve c) { } x.contents
    else x;

  config = outside // fill "config" result.options userConfig;
  result = module { inherit config lib pkgs utils; };
in
{
  inherit config;
  definitions = resolve result.config;
}
