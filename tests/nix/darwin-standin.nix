# A hand-written stand-in for what CI cannot fetch: the part of nixpkgs' module system and of
# nix-darwin's options that nix/module.nix uses. Real nix-darwin + nixpkgs.lib are evaluated by
# the same harness (eval-darwin.nix) when they are on the machine; this keeps CI honest
# offline. Declared the way nix-darwin declares them (launchd keys, users, /etc files, build
# machines, activation phases), with their types checked, unknown options refused, mkIf pushed
# down lazily, mkBefore/mkAfter ordered and mkDefault/mkForce priorities kept.
let
  inherit (builtins)
    all any attrNames concatLists concatStringsSep elem filter foldl' genList head isAttrs
    isBool isFunction isInt isList isPath isString length listToAttrs map mapAttrs sort
    stringLength substring toJSON;

  # -- lib: the functions module.nix, guest.nix and the harness call -------------------------
  lib = rec {
    mkIf = condition: content: { _type = "if"; inherit condition content; };
    mkMerge = contents: { _type = "merge"; inherit contents; };
    mkOverride = priority: content: { _type = "override"; inherit priority content; };
    mkDefault = mkOverride 1000;
    mkForce = mkOverride 50;
    mkOrder = priority: content: { _type = "order"; inherit priority content; };
    mkBefore = mkOrder 500;
    mkAfter = mkOrder 1500;
    mkOption = attrs: attrs // { _type = "option"; };
    mkEnableOption = name: mkOption { type = types.bool; default = false; description = "Whether to enable ${name}."; };
    literalExpression = text: { _type = "literalExpression"; inherit text; };
    optionalAttrs = cond: as: if cond then as else { };
    optional = cond: x: if cond then [ x ] else [ ];
    optionalString = cond: s: if cond then s else "";
    concatMapStrings = f: xs: concatStringsSep "" (map f xs);
    genAttrs = names: f: listToAttrs (map (n: { name = n; value = f n; }) names);
    hasPrefix = p: s: substring 0 (stringLength p) s == p;
    removeSuffix = p: s: if hasSuffix p s then substring 0 (stringLength s - stringLength p) s else s;
    inherit concatStringsSep;
    hasSuffix = p: s: let n = stringLength s; m = stringLength p; in n >= m && substring (n - m) m s == p;
    hasInfix = p: s: any (i: substring i (stringLength p) s == p) (genList (i: i) (stringLength s + 1));
    all = builtins.all;
    getExe = d: "${d}/bin/${d.meta.mainProgram}";

    types = rec {
      mk = name: check: merge: { inherit name check merge; };
      # merge functions take ctx = { loc (the option's path), name (its attribute name) }
      mergeEqual = ctx: vs:
        if all (v: v == head vs) vs then head vs
        else throw "The option `${ctx.loc}' has conflicting definition values: ${toJSON vs}";
      simple = name: check: mk name check mergeEqual;
      bool = simple "boolean" isBool;
      str = simple "string" isString;
      int = simple "signed integer" isInt;
      path = simple "path" (v: isPath v || (isString v && substring 0 1 v == "/"));
      package = simple "package" (v: isAttrs v && v ? outPath);
      port = simple "16 bit unsigned integer" (v: isInt v && v >= 0 && v <= 65535);
      ints.positive = simple "positive integer" (v: isInt v && v > 0);
      enum = vals: simple "one of ${toJSON vals}" (v: elem v vals);
      either = a: b: mk "${a.name} or ${b.name}" (v: a.check v || b.check v) mergeEqual;
      nullOr = t: mk "null or ${t.name}" (v: v == null || t.check v)
        (ctx: vs: if all (v: v == null) vs then null else t.merge ctx (filter (v: v != null) vs));
      anything = mk "anything" (v: true) (ctx: vs: if length vs == 1 then head vs else mergeEqual ctx vs);
      lines = mk "lines" isString (ctx: vs: concatStringsSep "\n" vs);
      deferredModule = mk "module" (v: true) (ctx: vs: vs);
      listOf = t: mk "list of ${t.name}" isList (ctx: vs: checkAll ctx t (concatLists vs));
      # A name whose every definition sits under a false mkIf is no attribute at all.
      attrsOf = t: mk "attribute set of ${t.name}" isAttrs (ctx: vs:
        let
          names = attrNames (foldl' (a: v: a // v) { } (concatLists (map pushDown vs)));
          kept = filter (n: concatLists (map resolve (valuesAt n vs)) != [ ]) names;
        in
        listToAttrs (map (n: {
          name = n;
          value = evalOption { loc = "${ctx.loc}.${n}"; name = n; } { type = t; } (valuesAt n vs);
        }) kept));
      # decls: { name, config } -> option declarations (config = this submodule's own values)
      submodule = decls: mk "submodule" isAttrs (ctx: vs:
        let self = evalTree ctx.loc (decls { inherit (ctx) name; config = self; }) vs; in self);
    };
  };

  isOption = v: isAttrs v && (v._type or null) == "option";

  # mkIf / mkMerge on an attribute set: a list of sets whose values carry the condition, so
  # attribute names are known without evaluating any condition (how a module can read its
  # own config under `config = mkIf cfg.enable …`).
  pushDown = d:
    if !(isAttrs d) then [ d ]
    else if (d._type or null) == "if" then
      map (as: mapAttrs (_: v: lib.mkIf d.condition v) as) (pushDown d.content)
    else if (d._type or null) == "merge" then concatLists (map pushDown d.contents)
    else [ d ];
  valuesAt = n: defs: map (d: d.${n}) (filter (d: d ? ${n}) (concatLists (map pushDown defs)));

  # One option's values: conditions applied, the best priority kept, then ordered.
  resolve = v:
    if isAttrs v && (v._type or null) == "if" then (if v.condition then resolve v.content else [ ])
    else if isAttrs v && (v._type or null) == "merge" then concatLists (map resolve v.contents)
    else [ v ];
  prio = v: if isAttrs v && (v._type or null) == "override" then v.priority else 100;
  unwrapPrio = v: if isAttrs v && (v._type or null) == "override" then v.content else v;
  order = v: if isAttrs v && (v._type or null) == "order" then v.priority else 1000;
  unwrapOrder = v: if isAttrs v && (v._type or null) == "order" then v.content else v;

  # List elements: each checked, and evaluated on its own when it is a submodule.
  checkAll = ctx: t: vs:
    map (v: if !(t.check v) then throw "The option value `${ctx.loc}' is not of type `${t.name}': ${toJSON v}"
            else if t.name == "submodule" then t.merge ctx [ v ] else v) vs;

  evalOption = ctx: opt: defs:
    let
      vs = concatLists (map resolve defs);
      best = foldl' (m: v: if prio v < m then prio v else m) 9999 vs;
      kept = map unwrapPrio (filter (v: prio v == best) vs);
      ordered = map unwrapOrder (sort (a: b: order a < order b) kept);
      checked = map (v:
        if opt.type.check v then v
        else throw "The option value `${ctx.loc}' is not of type `${opt.type.name}': ${toJSON v}") ordered;
    in
    if vs == [ ] then (if opt ? default then opt.default else throw "The option `${ctx.loc}' is used but not defined.")
    else opt.type.merge ctx checked;

  evalTree = loc: decls: defs:
    let
      defined = concatLists (map (d: attrNames d) (concatLists (map pushDown defs)));
      unknown = filter (n: !(decls ? ${n}) && n != "_module") defined;
      at = n: if loc == "" then n else "${loc}.${n}";
    in
    if unknown != [ ] then throw "The option `${at (head unknown)}' does not exist."
    else mapAttrs (n: d:
      if isOption d then evalOption { loc = at n; name = n; } d (valuesAt n defs)
      else evalTree (at n) d (valuesAt n defs))
      decls;

  mergeDecls = a: b: a // mapAttrs (n: v:
    if a ? ${n} && !(isOption v) && !(isOption a.${n}) then mergeDecls a.${n} v else v) b;

  # -- the nix-darwin options nix/module.nix sets, typed as nix-darwin types them -------------
  darwin = { config, lib, pkgs, ... }:
    let
      inherit (lib) mkOption types;
      opt = type: default: mkOption { inherit type default; };
      req = type: mkOption { inherit type; };
      nullable = t: opt (types.nullOr t) null;
      managed = name: default: if config.nix.enable then default else throw ''
        ${name}: accessed when `nix.enable` is off; this is a bug in
        nix-darwin or a third‐party module
      '';
      launchdJob = { ... }: {
        Label = req types.str;
        ProgramArguments = nullable (types.listOf types.str);
        RunAtLoad = nullable types.bool;
        KeepAlive = nullable (types.either types.bool types.anything);
        ExitTimeOut = nullable types.int;
        WorkingDirectory = nullable types.str;
        StandardOutPath = nullable types.str;
        StandardErrorPath = nullable types.str;
        ProcessType = nullable (types.enum [ "Background" "Standard" "Adaptive" "Interactive" ]);
        EnvironmentVariables = nullable (types.attrsOf types.str);
        SoftResourceLimits = nullable (types.submodule (_: { NumberOfFiles = nullable types.int; }));
        UserName = nullable types.str;
        GroupName = nullable types.str;
      };
    in
    {
      options = {
        assertions = opt (types.listOf types.anything) [ ];
        warnings = opt (types.listOf types.str) [ ];
        users.users = opt (types.attrsOf (types.submodule ({ name, ... }: {
          name = opt types.str name;
          uid = nullable types.int;
          gid = opt types.int 20;
          home = opt types.path "/var/empty";
          createHome = opt types.bool false;
          shell = opt (types.either types.package types.path) "/sbin/nologin";
          isHidden = opt types.bool true;
          description = nullable types.str;
        }))) { };
        users.groups = opt (types.attrsOf (types.submodule ({ name, ... }: {
          name = opt types.str name;
          gid = nullable types.int;
          members = opt (types.listOf types.str) [ ];
          description = opt types.str "";
        }))) { };
        users.knownUsers = opt (types.listOf types.str) [ ];
        users.knownGroups = opt (types.listOf types.str) [ ];
        environment.etc = opt (types.attrsOf (types.submodule ({ name, config }: {
          text = nullable types.lines;
          source = opt types.path (pkgs.writeText "etc-${baseNameOf name}" config.text);
        }))) { };
        environment.systemPackages = opt (types.listOf types.package) [ ];
        launchd.daemons = opt (types.attrsOf (types.submodule (_: {
          serviceConfig = opt (types.submodule launchdJob) { };
        }))) { };
        # nix-darwin manages Nix (nix.conf, nix/machines) only with nix.enable; reading one of
        # its unset nix.* options without it throws (its `managedDefault`).
        nix.enable = opt types.bool true;
        nix.settings = opt (types.attrsOf types.anything) (managed "nix.settings" { });
        nix.distributedBuilds = opt types.bool (managed "nix.distributedBuilds" false);
        nix.buildMachines = opt (types.listOf (types.submodule (_: {
          hostName = req types.str;
          protocol = opt (types.enum [ null "ssh" "ssh-ng" ]) "ssh";
          system = nullable types.str;
          systems = opt (types.listOf types.str) [ ];
          maxJobs = opt types.int 1;
          speedFactor = opt types.int 1;
          supportedFeatures = opt (types.listOf types.str) [ ];
          mandatoryFeatures = opt (types.listOf types.str) [ ];
          sshUser = nullable types.str;
          sshKey = nullable types.str;
          publicHostKey = nullable types.str;
        }))) (managed "nix.buildMachines" [ ]);
        system.activationScripts = opt (types.attrsOf (types.submodule (_: {
          text = opt types.lines "";
        }))) { };
        system.build = opt (types.attrsOf types.anything) { };
        # What a configuration sets beside modules (the install example does).
        system.stateVersion = nullable types.int;
        nixpkgs.hostPlatform = nullable types.str;
      };
      # What nix-darwin's modules/nix/default.nix does with build machines: /etc/nix/machines,
      # written only when it manages Nix, in the same format.
      config.environment.etc."nix/machines" =
        lib.mkIf (config.nix.enable && config.nix.buildMachines != [ ]) {
          text = machinesText config.nix.buildMachines;
        };
    };

  # nix-darwin's (and Determinate's) /etc/nix/machines lines.
  machinesText = concatMapLines (m:
    let dash = xs: if xs == [ ] then "-" else concatStringsSep "," xs; in
    concatStringsSep " " [
      "${if m.protocol != null then "${m.protocol}://" else ""}${if m.sshUser != null then "${m.sshUser}@" else ""}${m.hostName}"
      (if m.system != null then m.system else if m.systems != [ ] then concatStringsSep "," m.systems else "-")
      (if m.sshKey != null then m.sshKey else "-")
      (toString m.maxJobs)
      (toString m.speedFactor)
      (dash (m.supportedFeatures ++ m.mandatoryFeatures))
      (dash m.mandatoryFeatures)
      (if m.publicHostKey != null then m.publicHostKey else "-")
    ]);
  concatMapLines = f: xs: concatStringsSep "" (map (x: f x + "\n") xs);

  eval = { lib, pkgs, modules }:
    let
      args = { inherit config lib pkgs options; };
      load = m:
        let v = if isPath m then import m else m;
            r = if isFunction v then v args else v;
        in if r ? options || r ? config || r ? imports
           then { options = r.options or { }; config = r.config or { }; }
           else { options = { }; config = r; };
      loaded = map load (modules ++ [ darwin ]);
      options = foldl' mergeDecls { } (map (m: m.options) loaded);
      config = evalTree "" options (map (m: m.config) loaded);
    in
    config;
in
{ inherit lib eval machinesText; }
