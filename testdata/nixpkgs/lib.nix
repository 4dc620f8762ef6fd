# A small stand-in for nixpkgs' lib.evalModules (see README.md). It follows
# lib/modules.nix where the tests depend on it:
#   - modules are collected through imports and deduplicated by key (a
#     module's own `key`, else its file, else PARENT:anon-N), keeping the
#     first one met in breadth-first order, as builtins.genericClosure does;
#   - an option declared by two modules fails: "The option `X' in `F' is
#     already declared in `G'";
#   - definitions carry priorities (mkOverride: mkForce 50, plain 100,
#     mkDefault 1000, option defaults 1500) and only the best survive; lists
#     concatenate, attribute sets merge per attribute (lazily, so mkIf
#     conditions may read config), and other values must be equal:
#     "The option `X' has conflicting definition values";
#   - below the top level, attributes defined only under false mkIfs are
#     absent (attrsOf drops them).
# Options are not typed and undeclared options are allowed (there are no
# NixOS option declarations here).
let
  inherit (builtins) isAttrs isFunction isList isPath isString concatMap filter all attrNames listToAttrs foldl' head elem concatStringsSep toJSON;
  unique = foldl' (acc: x: if elem x acc then acc else acc ++ [ x ]) [ ];
  imap1 = f: l: builtins.genList (i: f (i + 1) (builtins.elemAt l i)) (builtins.length l);
in
rec {
  mkOption = attrs: attrs // { _type = "option"; };
  mkIf = condition: content: { _type = "if"; inherit condition content; };
  mkMerge = contents: { _type = "merge"; inherit contents; };
  mkOverride = priority: content: { _type = "override"; inherit priority content; };
  mkOptionDefault = mkOverride 1500;
  mkDefault = mkOverride 1000;
  mkForce = mkOverride 50;
  literalExpression = text: { _type = "literalExpression"; inherit text; };
  types = rec {
    str = "str"; bool = "bool"; int = "int"; package = "package"; attrs = "attrs"; path = "path";
    enum = _: "enum"; nullOr = _: "nullOr"; listOf = _: "listOf"; attrsOf = _: "attrsOf";
  };

  # What the value of a definition looks like in an error message.
  show = v:
    if isAttrs v && v ? outPath then toString v.outPath
    else if isFunction v then "<function>"
    else toJSON v;

  # defs: [ { conds = [ bool ]; file; value; } ] for one attribute path.
  mergeDefs = path: defs:
    let
      where = concatStringsSep "." path;
      expand = d:
        let v = d.value; t = if isAttrs v then v._type or null else null; in
        if t == "if" then expand (d // { conds = d.conds ++ [ v.condition ]; value = v.content; })
        else if t == "merge" then concatMap (c: expand (d // { value = c; })) v.contents
        else [ d ];
      ds = concatMap expand defs;
      isSet = d: isAttrs d.value && !(d.value ? _type) && (d.value.type or null) != "derivation";
      active = filter (d: all (c: c) d.conds) ds;
      prio = d: if isAttrs d.value && (d.value._type or null) == "override" then d.value.priority else 100;
      unwrap = d: if isAttrs d.value && (d.value._type or null) == "override" then d.value.content else d.value;
      best = foldl' (m: d: if prio d < m then prio d else m) 100000 active;
      chosen = filter (d: prio d == best) active;
      # Below the top level, an attribute whose definitions are all under a
      # false mkIf is absent (systemd.services.NAME, fileSystems.PATH: NixOS's
      # attrsOf drops it). The top level's names stay unfiltered so that
      # mkIf conditions reading config do not recurse; a condition must not
      # read the attribute set it decides on (declared options make that
      # work in NixOS, not here).
      activeValue = v:
        let t = if isAttrs v then v._type or null else null; in
        if t == "if" then v.condition && activeValue v.content
        else if t == "merge" then builtins.any activeValue v.contents
        else true;
      present = n: builtins.any (d: all (c: c) d.conds && d.value ? ${n} && activeValue d.value.${n}) ds;
      names = filter (n: path == [ ] || present n) (unique (concatMap (d: attrNames d.value) ds));
      first = unwrap (head chosen);
      same = a: b:
        if isFunction a || isFunction b then true
        else if isAttrs a && a ? outPath && isAttrs b && b ? outPath then toString a.outPath == toString b.outPath
        else a == b;
      conflicts = filter (d: !(same (unwrap d) first)) chosen;
    in
    if ds != [ ] && all isSet ds then
      listToAttrs (map (n: {
        name = n;
        value = mergeDefs (path ++ [ n ]) (concatMap (d: if d.value ? ${n} then [ (d // { value = d.value.${n}; }) ] else [ ]) ds);
      }) names)
    else if chosen == [ ] then
      throw "fake lib: ${where} has no (active) definition"
    else if isList first then
      concatMap unwrap chosen
    else if conflicts != [ ] then
      throw "The option `${where}' has conflicting definition values:${concatStringsSep "" (map (d: "\n- In `${d.file}': ${show (unwrap d)}") chosen)}"
    else
      first;

  # evalModules { modules; specialArgs } -> { config; }
  evalModules = { modules, specialArgs ? { } }:
    let
      lib = import ./lib.nix;
      args = specialArgs // { inherit config lib; pkgs = specialArgs.pkgs or { }; options = { }; modulesPath = toString ../nixos/modules; };

      # One module in canonical form, as lib/modules.nix's unifyModuleSyntax.
      load = parentKey: n: m:
        let
          fromFile = isPath m || isString m;
          file = if fromFile then toString m else "${parentKey}:anon-${toString n}";
          m1 = if fromFile then import m else m;
          m2 = if isFunction m1 then m1 args else m1;
          structured = m2 ? options || m2 ? config;
        in
        {
          key = if m2 ? key then toString m2.key else file;
          file = toString (m2._file or file);
          imports = m2.imports or [ ];
          options = m2.options or { };
          config = if structured then m2.config or { } else removeAttrs m2 [ "imports" "key" "_file" "disabledModules" ];
        };
      collect = parentKey: ms: imap1 (n: m:
        let mod = load parentKey n m; in
        { inherit (mod) key; inherit mod; children = collect mod.key mod.imports; }) ms;
      all' = map (x: x.mod) (builtins.genericClosure {
        startSet = collect "" modules;
        operator = x: x.children;
      });

      # Every option declaration, checked for duplicates.
      optionPaths = prefix: o:
        if (o._type or null) == "option" then [ prefix ]
        else concatMap (n: optionPaths (prefix ++ [ n ]) o.${n}) (attrNames o);
      decls = concatMap (m: map (p: { path = concatStringsSep "." p; inherit (m) file; }) (optionPaths [ ] m.options)) all';
      declared = foldl'
        (seen: d:
          if seen ? ${d.path} then throw "The option `${d.path}' in `${d.file}' is already declared in `${seen.${d.path}}'."
          else seen // { ${d.path} = d.file; })
        { }
        decls;

      # Option defaults as definitions of low priority.
      optDefs = o:
        if (o._type or null) == "option" then (if o ? default then mkOptionDefault o.default else mkMerge [ ])
        else builtins.mapAttrs (n: optDefs) o;
      defs = map (m: { conds = [ ]; inherit (m) file; value = m.config; }) all'
        ++ map (m: { conds = [ ]; inherit (m) file; value = optDefs m.options; }) all';
      config = builtins.seq declared (mergeDefs [ ] defs);
    in
    { inherit config; };
}
